<?php
// Publish and get one message through the proxy with the php-amqp extension
// (Debian package php-amqp, librabbitmq-based).
// usage: php ext_amqp_roundtrip.php [host] [port]   (or AMQP_HOST / AMQP_PORT)
// Exit 0 on success, 1 with a message on stderr otherwise.

error_reporting(E_ALL);
if (!extension_loaded('amqp')) {
    fwrite(STDERR, "php-amqp extension not loaded (apt-get install php-amqp)\n");
    exit(1);
}

$host = $argv[1] ?? (getenv('AMQP_HOST') ?: '127.0.0.1');
$port = (int)($argv[2] ?? (getenv('AMQP_PORT') ?: 5673));

try {
    $conn = new AMQPConnection([
        'host' => $host, 'port' => $port, 'vhost' => '/',
        'login' => getenv('AMQP_USER') ?: 'guest',
        'password' => getenv('AMQP_PASSWORD') ?: 'guest',
        'connect_timeout' => 10, 'read_timeout' => 10, 'write_timeout' => 10,
    ]);
    $conn->connect();
    $ch = new AMQPChannel($conn);
    $queueName = 'amqproxy-test-php-ext-' . bin2hex(random_bytes(8));
    $q = new AMQPQueue($ch);
    $q->setName($queueName);
    $q->setArguments(['x-expires' => 60000]);
    $q->declareQueue();

    $ex = new AMQPExchange($ch);   // the default exchange
    $body = random_bytes(4096) . "\x00\xff end";
    $ex->publish($body, $queueName, AMQP_NOPARAM, [
        'content_type' => 'application/octet-stream',
        'message_id' => 'php-amqp-1',
        'headers' => ['x-test' => 'ext-amqp'],
    ]);

    $env = false;
    for ($i = 0; $i < 50 && $env === false; $i++) {   // Basic.Get until it is there
        $env = $q->get(AMQP_AUTOACK);
        if ($env === false || $env === null) { $env = false; usleep(20000); }
    }
    if ($env === false) throw new Exception("message not received from $queueName");
    if ($env->getBody() !== $body) {
        throw new Exception(sprintf("body differs: got %d bytes, want %d", strlen($env->getBody()), strlen($body)));
    }
    if ($env->getMessageId() !== 'php-amqp-1' || $env->getContentType() !== 'application/octet-stream') {
        throw new Exception("properties differ");
    }
    if ($env->getHeader('x-test') !== 'ext-amqp') {
        throw new Exception("headers differ: " . json_encode($env->getHeaders()));
    }
    $q->delete();
    $conn->disconnect();
} catch (Throwable $e) {
    fwrite(STDERR, "php-amqp extension roundtrip failed: " . get_class($e) . ": " . $e->getMessage() . "\n");
    exit(1);
}
echo "php-amqp extension roundtrip ok\n";
exit(0);
