<?php
// Publish and get one message through the proxy with php-amqplib (Debian
// package php-amqplib), using its default login method, AMQPLAIN.
// usage: php amqplib_roundtrip.php [host] [port]   (or AMQP_HOST / AMQP_PORT)
// Exit 0 on success, 1 with a message on stderr otherwise.

error_reporting(E_ALL);
$autoloads = [
    getenv('PHP_AMQPLIB_AUTOLOAD') ?: '',
    '/usr/share/php/PhpAmqpLib/autoload.php',
    __DIR__ . '/../../vendor/autoload.php',
];
$found = false;
foreach ($autoloads as $a) {
    if ($a !== '' && is_file($a)) { require $a; $found = true; break; }
}
if (!$found) {
    fwrite(STDERR, "php-amqplib not found (apt-get install php-amqplib)\n");
    exit(1);
}

use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Message\AMQPMessage;
use PhpAmqpLib\Wire\AMQPTable;

$host = $argv[1] ?? (getenv('AMQP_HOST') ?: '127.0.0.1');
$port = (int)($argv[2] ?? (getenv('AMQP_PORT') ?: 5673));
$user = getenv('AMQP_USER') ?: 'guest';
$pass = getenv('AMQP_PASSWORD') ?: 'guest';

try {
    // login_method defaults to AMQPLAIN; spelled out so a library default change is noticed
    $conn = new AMQPStreamConnection($host, $port, $user, $pass, '/', false, 'AMQPLAIN',
                                     null, 'en_US', 10.0, 10.0);
    $ch = $conn->channel();
    $queue = 'amqproxy-test-php-amqplib-' . bin2hex(random_bytes(8));
    $ch->queue_declare($queue, false, false, false, false, false, new AMQPTable(['x-expires' => 60000]));

    $body = random_bytes(4096) . "\x00\xff end";
    $msg = new AMQPMessage($body, [
        'content_type' => 'application/octet-stream',
        'delivery_mode' => AMQPMessage::DELIVERY_MODE_PERSISTENT,
        'message_id' => 'php-amqplib-1',
        'application_headers' => new AMQPTable(['x-test' => 'amqplib', 'n' => 7]),
    ]);
    $ch->basic_publish($msg, '', $queue);

    $got = null;
    for ($i = 0; $i < 50 && $got === null; $i++) {   // Basic.Get until it is there (publish is async)
        $got = $ch->basic_get($queue, true);
        if ($got === null) usleep(20000);
    }
    if ($got === null) throw new Exception("message not received from $queue");
    if ($got->getBody() !== $body) {
        throw new Exception(sprintf("body differs: got %d bytes, want %d", strlen($got->getBody()), strlen($body)));
    }
    if ($got->get('message_id') !== 'php-amqplib-1' || $got->get('content_type') !== 'application/octet-stream') {
        throw new Exception("properties differ");
    }
    $headers = $got->get('application_headers')->getNativeData();
    if (($headers['x-test'] ?? null) !== 'amqplib' || ($headers['n'] ?? null) !== 7) {
        throw new Exception("headers differ: " . json_encode($headers));
    }
    $ch->queue_delete($queue);
    $ch->close();
    $conn->close();
} catch (Throwable $e) {
    fwrite(STDERR, "php-amqplib roundtrip failed: " . get_class($e) . ": " . $e->getMessage() . "\n");
    exit(1);
}
echo "php-amqplib (AMQPLAIN) roundtrip ok\n";
exit(0);
