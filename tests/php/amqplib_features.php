<?php
// php-amqplib (Debian package php-amqplib) feature tour, run through the
// proxy by tests/python/test_php_features.py (and directly against RabbitMQ
// to check the program itself).
//
// usage: php amqplib_features.php HOST PORT
// Prints "ok <step>" after each step and "php-amqplib features ok" at the
// end; on the first failure prints "php-amqplib features FAILED in step
// <step>: ..." on stderr and exits 1.
//
// Queues have random names and x-expires; exchanges are auto-delete and are
// deleted at the end of their step. Asynchronous events (deliveries, acks,
// returns) are awaited with the library's wait() / wait_for_pending_acks()
// and a timeout, never with a sleep.
//
// Step 8 (consumer cancel notification) is bunny-only in this suite
// (php-amqplib turns a server Basic.Cancel into an AMQPBasicCancelException).

error_reporting(E_ALL);
set_error_handler(function ($no, $str, $file, $line) {
    if (!(error_reporting() & $no)) return false;   // @-silenced
    throw new ErrorException($str, 0, $no, $file, $line);
});
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
    fwrite(STDERR, "php-amqplib features FAILED in step (setup): php-amqplib not found (apt-get install php-amqplib)\n");
    exit(1);
}

use PhpAmqpLib\Channel\AMQPChannel;
use PhpAmqpLib\Connection\AMQPStreamConnection;
use PhpAmqpLib\Exception\AMQPProtocolChannelException;
use PhpAmqpLib\Exception\AMQPTimeoutException;
use PhpAmqpLib\Message\AMQPMessage;
use PhpAmqpLib\Wire\AMQPTable;

const WAIT = 15.0;   // seconds allowed for any single awaited event

class StepFailed extends Exception {}

$HOST = $argv[1] ?? '127.0.0.1';
$PORT = (int)($argv[2] ?? 5672);
$SUFFIX = bin2hex(random_bytes(6));

function rname(string $tag): string {
    global $SUFFIX;
    return "amqproxy-test-amqplib-$tag-$SUFFIX";
}

function show($v): string {
    return is_string($v) && strlen($v) > 64 ? strlen($v) . ' bytes' : json_encode($v);
}

function check(bool $cond, string $msg): void {
    if (!$cond) throw new StepFailed($msg);
}

function check_eq($got, $want, string $what): void {
    if ($got !== $want) throw new StepFailed("$what: got " . show($got) . ", want " . show($want));
}

/** Runs $ch->wait() until $done() is true, at most $timeout seconds in all. */
function wait_until(AMQPChannel $ch, callable $done, string $what, float $timeout = WAIT): void {
    $deadline = microtime(true) + $timeout;
    while (!$done()) {
        $left = $deadline - microtime(true);
        if ($left <= 0) throw new StepFailed("timed out after {$timeout}s waiting for $what");
        try {
            $ch->wait(null, false, $left);
        } catch (AMQPTimeoutException $e) {
            throw new StepFailed("timed out after {$timeout}s waiting for $what");
        }
    }
}

function connect(array $opt = []): AMQPStreamConnection {
    global $HOST, $PORT;
    $hb = $opt['heartbeat'] ?? 0;
    $rw = $opt['read_write_timeout'] ?? 20.0;
    return new AMQPStreamConnection($HOST, $PORT, 'guest', 'guest', '/', false, 'AMQPLAIN', null, 'en_US',
                                    10.0, $rw, null, false, $hb, $opt['rpc_timeout'] ?? WAIT);
}

function declare_queue(AMQPChannel $ch, string $tag): string {
    $name = rname($tag);
    $ch->queue_declare($name, false, false, false, false, false, new AMQPTable(['x-expires' => 120000]));
    return $name;
}

function ready(AMQPChannel $aux, string $queue): int {
    [, $count] = $aux->queue_declare($queue, true);
    return $count;
}

/** basic.get (no-ack) until the queue is empty; the bodies. */
function drain(AMQPChannel $ch, string $queue): array {
    $out = [];
    while (($m = $ch->basic_get($queue, true)) !== null) $out[] = $m->getBody();
    return $out;
}

$STEP = '(connect)';
function step(string $name, callable $fn): void {
    global $STEP;
    $STEP = $name;
    $t0 = microtime(true);
    $fn();
    printf("ok %-60s %6.2fs\n", $name, microtime(true) - $t0);
    fflush(STDOUT);
}

try {
    $conn = connect();
    $aux = $conn->channel();   // passive declares and deletes

    step('1 qos prefetch 3, manual ack, reject/nack requeue, ack multiple', function () use ($conn, $aux) {
        $pub = $conn->channel();
        $pub->confirm_select();
        $ch = $conn->channel();
        $ch->basic_qos(0, 3, false);
        $q = declare_queue($ch, 'qos');
        for ($i = 0; $i < 10; $i++) $pub->basic_publish(new AMQPMessage("m$i"), '', $q);
        $pub->wait_for_pending_acks(WAIT);
        $pub->close();
        check_eq(ready($aux, $q), 10, 'messages in the queue before consuming');

        $got = [];
        $ctag = $ch->basic_consume($q, '', false, false, false, false, function (AMQPMessage $m) use (&$got) {
            $got[] = $m;
        });
        $take = function (int $n, string $what) use ($ch, &$got): array {
            wait_until($ch, function () use (&$got, $n) { return count($got) >= $n; }, $what);
            return array_splice($got, 0, $n);
        };
        $bodies = function (array $ms) { return array_map(function ($m) { return $m->getBody(); }, $ms); };
        $redelivered = function (array $ms) { return array_map(function ($m) { return $m->isRedelivered(); }, $ms); };

        $first = $take(3, 'three deliveries (prefetch 3)');
        check_eq($bodies($first), ['m0', 'm1', 'm2'], 'first three deliveries');
        check_eq($redelivered($first), [false, false, false], 'redelivered flags of the first deliveries');
        // the broker holds back the other 7 while 3 are unacked
        check_eq(ready($aux, $q), 7, 'ready messages with 3 unacked under prefetch 3');

        $ch->basic_reject($first[0]->getDeliveryTag(), true);
        [$m] = $take(1, 'the redelivery after basic.reject(requeue)');
        check_eq([$m->getBody(), $m->isRedelivered()], ['m0', true], '[body, redelivered] after reject(requeue)');
        $ch->basic_nack($first[1]->getDeliveryTag(), false, true);
        [$m] = $take(1, 'the redelivery after basic.nack(requeue)');
        check_eq([$m->getBody(), $m->isRedelivered()], ['m1', true], '[body, redelivered] after nack(requeue)');
        check_eq(ready($aux, $q), 7, 'ready messages after the requeues were redelivered');

        // unacked now: m2, m0 and m1 (redelivered); one multiple ack frees all
        // three prefetch slots, so exactly the next three arrive
        $last = $m->getDeliveryTag();
        foreach ([['m3', 'm4', 'm5'], ['m6', 'm7', 'm8'], ['m9']] as $want) {
            $ch->basic_ack($last, true);
            $batch = $take(count($want), implode(',', $want) . ' after basic.ack(multiple)');
            check_eq($bodies($batch), $want, 'deliveries after basic.ack(multiple)');
            check(!in_array(true, $redelivered($batch), true), 'a new delivery is flagged redelivered');
            $last = end($batch)->getDeliveryTag();
        }
        $ch->basic_ack($last, true);
        check_eq(ready($aux, $q), 0, 'ready messages after everything was delivered');
        $ch->basic_cancel($ctag);
        // basic.recover requeues whatever is still unacked on this channel, and
        // a basic.get on the same channel is ordered after it: must find nothing
        $ch->basic_recover(true);
        $m = $ch->basic_get($q, true);
        check_eq($m ? $m->getBody() : null, null, 'message back in the queue after basic.recover (an ack was lost)');
        check_eq(count($got), 0, 'unexpected extra deliveries');
        $ch->close();
        $aux->queue_delete($q);
    });

    step('2 publisher confirms: 500 publishes, wait_for_pending_acks, all acked', function () use ($conn, $aux) {
        $ch = $conn->channel();
        $ch->confirm_select();
        $acked = [];
        $nacked = [];
        $ch->set_ack_handler(function (AMQPMessage $m) use (&$acked) { $acked[] = $m->getBody(); });
        $ch->set_nack_handler(function (AMQPMessage $m) use (&$nacked) { $nacked[] = $m->getBody(); });
        $q = declare_queue($ch, 'confirms');
        for ($i = 0; $i < 500; $i++) $ch->basic_publish(new AMQPMessage("c$i"), '', $q);
        $ch->wait_for_pending_acks(WAIT);
        check_eq($nacked, [], 'nacked publishes');
        sort($acked);
        $want = array_map(function ($i) { return "c$i"; }, range(0, 499));
        sort($want);
        check_eq($acked, $want, 'the set of acked publishes');
        check_eq(ready($aux, $q), 500, 'messages in the queue after 500 confirmed publishes');
        $ch->close();
        $aux->queue_delete($q);
    });

    step('3 mandatory unroutable publish -> basic.return 312 NO_ROUTE (set_return_listener)', function () use ($conn) {
        $rk = rname('nowhere');
        // (a) a plain channel: wait() for the return
        $ch = $conn->channel();
        $returns = [];
        $ch->set_return_listener(function ($code, $text, $exchange, $routing_key, AMQPMessage $m) use (&$returns) {
            $returns[] = [$code, $text, $exchange, $routing_key, $m->getBody(), $m->get('message_id')];
        });
        $ch->basic_publish(new AMQPMessage('unroutable body', ['message_id' => 'ret-1']), '', $rk, true);
        wait_until($ch, function () use (&$returns) { return count($returns) > 0; }, 'basic.return');
        check_eq($returns, [[312, 'NO_ROUTE', '', $rk, 'unroutable body', 'ret-1']],
                 '[code, text, exchange, routing key, body, message_id] of the return');
        $ch->close();

        // (b) with confirms: the return arrives before the ack of the same publish
        $ch = $conn->channel();
        $ch->confirm_select();
        $events = [];
        $ch->set_return_listener(function ($code, $text, $exchange, $routing_key, AMQPMessage $m) use (&$events) {
            $events[] = "return $code $text " . $m->getBody();
        });
        $ch->set_ack_handler(function (AMQPMessage $m) use (&$events) { $events[] = 'ack ' . $m->getBody(); });
        $ch->set_nack_handler(function (AMQPMessage $m) use (&$events) { $events[] = 'nack ' . $m->getBody(); });
        $ch->basic_publish(new AMQPMessage('unroutable 2'), '', $rk, true);
        $ch->wait_for_pending_acks_returns(WAIT);
        check_eq($events, ['return 312 NO_ROUTE unroutable 2', 'ack unroutable 2'], 'events of a confirmed mandatory publish');
        $ch->close();
    });

    step('4 tx select / rollback / commit', function () use ($conn, $aux) {
        $ch = $conn->channel();
        $q = declare_queue($ch, 'tx');
        $ch->tx_select();
        $ch->basic_publish(new AMQPMessage('rolled back'), '', $q);
        check_eq(ready($aux, $q), 0, 'uncommitted publish visible in the queue');
        $ch->tx_rollback();
        check_eq(ready($aux, $q), 0, 'messages after tx.rollback');
        $ch->basic_publish(new AMQPMessage('committed-1'), '', $q);
        $ch->basic_publish(new AMQPMessage('committed-2'), '', $q);
        $ch->tx_commit();
        check_eq(ready($aux, $q), 2, 'messages after tx.commit');
        // acks are transactional too: a rolled-back ack leaves the messages
        // unacked, so closing the channel requeues both
        $m1 = $ch->basic_get($q, false);
        $m2 = $ch->basic_get($q, false);
        check($m1 !== null && $m2 !== null, 'basic.get found no message');
        check_eq([$m1->getBody(), $m2->getBody()], ['committed-1', 'committed-2'], 'bodies of the committed messages');
        $ch->basic_ack($m2->getDeliveryTag(), true);
        $ch->tx_rollback();
        $ch->close();
        $ch = $conn->channel();
        $ch->tx_select();
        $got = [];
        $ctag = $ch->basic_consume($q, '', false, false, false, false, function (AMQPMessage $m) use (&$got) {
            $got[] = $m;
        });
        wait_until($ch, function () use (&$got) { return count($got) >= 2; }, 'the messages whose ack was rolled back');
        check_eq(array_map(function ($m) { return [$m->getBody(), $m->isRedelivered()]; }, $got),
                 [['committed-1', true], ['committed-2', true]],
                 '[body, redelivered] of the messages whose ack was rolled back');
        $ch->basic_cancel($ctag);
        // a committed ack of the first and a committed reject(requeue) of the second
        $ch->basic_ack($got[0]->getDeliveryTag());
        $ch->basic_reject($got[1]->getDeliveryTag(), true);
        check_eq(ready($aux, $q), 0, 'ready messages before tx.commit of a reject(requeue)');
        $ch->tx_commit();
        $m = $ch->basic_get($q, true);
        check_eq($m ? $m->getBody() : null, 'committed-2', 'the message rejected (requeue) in the committed transaction');
        $m = $ch->basic_get($q, true);
        check_eq($m ? $m->getBody() : null, null, 'a message left after the committed ack');
        $ch->close();
        $aux->queue_delete($q);
    });

    step('5 topic and headers exchange routing, exchange-to-exchange binding', function () use ($conn, $aux) {
        $ch = $conn->channel();
        $ch->confirm_select();
        $ch->set_nack_handler(function (AMQPMessage $m) { throw new StepFailed('nacked: ' . $m->getBody()); });

        $tx = rname('topic');
        $ch->exchange_declare($tx, 'topic', false, false, true);
        $qa = declare_queue($ch, 'topic-a');
        $qb = declare_queue($ch, 'topic-b');
        $ch->queue_bind($qa, $tx, 'a.*.c');
        $ch->queue_bind($qb, $tx, 'a.#');
        foreach (['a.b.c', 'a.x', 'z.z', 'a.b.c.d'] as $rk) $ch->basic_publish(new AMQPMessage("t:$rk"), $tx, $rk);
        $ch->wait_for_pending_acks(WAIT);
        check_eq(drain($ch, $qa), ['t:a.b.c'], 'queue bound with a.*.c received');
        check_eq(drain($ch, $qb), ['t:a.b.c', 't:a.x', 't:a.b.c.d'], 'queue bound with a.# received');

        $hx = rname('headers');
        $ch->exchange_declare($hx, 'headers', false, false, true);
        $qall = declare_queue($ch, 'hdr-all');
        $qany = declare_queue($ch, 'hdr-any');
        $ch->queue_bind($qall, $hx, '', false, new AMQPTable(['x-match' => 'all', 'k1' => 'v1', 'k2' => 'v2']));
        $ch->queue_bind($qany, $hx, '', false, new AMQPTable(['x-match' => 'any', 'k1' => 'v1', 'k3' => 'v3']));
        foreach ([['h12', ['k1' => 'v1', 'k2' => 'v2']], ['h3', ['k3' => 'v3']],
                  ['h2', ['k2' => 'v2']], ['h1x', ['k1' => 'v1', 'k2' => 'other']]] as [$body, $h]) {
            $ch->basic_publish(new AMQPMessage($body, ['application_headers' => new AMQPTable($h)]), $hx);
        }
        $ch->wait_for_pending_acks(WAIT);
        check_eq(drain($ch, $qall), ['h12'], 'x-match=all queue received');
        check_eq(drain($ch, $qany), ['h12', 'h3', 'h1x'], 'x-match=any queue received');

        $src = rname('e2e-src');
        $dst = rname('e2e-dst');
        $ch->exchange_declare($src, 'direct', false, false, true);
        $ch->exchange_declare($dst, 'fanout', false, false, true);
        $ch->exchange_bind($dst, $src, 'rk');
        $ch->exchange_bind($dst, $src, 'keep');   // src is auto-delete: keeps it alive after the unbind below
        $qd = declare_queue($ch, 'e2e');
        $ch->queue_bind($qd, $dst);
        $ch->basic_publish(new AMQPMessage('via e2e'), $src, 'rk');
        $ch->basic_publish(new AMQPMessage('not bound'), $src, 'other');
        $ch->wait_for_pending_acks(WAIT);
        check_eq(drain($ch, $qd), ['via e2e'], 'queue behind the exchange-to-exchange binding received');
        $ch->exchange_unbind($dst, $src, 'rk');
        $ch->basic_publish(new AMQPMessage('after unbind'), $src, 'rk');
        $ch->wait_for_pending_acks(WAIT);
        check_eq(drain($ch, $qd), [], 'queue behind a removed exchange-to-exchange binding received');

        foreach ([$qa, $qb, $qall, $qany, $qd] as $q) $aux->queue_delete($q);
        foreach ([$tx, $hx, $src, $dst] as $x) $aux->exchange_delete($x);
        $ch->close();
    });

    step('6 1 MiB and 4 MiB bodies byte-exact via basic.get and via consume', function () use ($conn, $aux) {
        $ch = $conn->channel();
        $ch->confirm_select();
        $q = declare_queue($ch, 'big');
        $bodies = [random_bytes(1 << 20), random_bytes(4 << 20)];
        foreach ($bodies as $b) {
            $ch->basic_publish(new AMQPMessage($b, ['content_type' => 'application/octet-stream']), '', $q);
        }
        $ch->wait_for_pending_acks(WAIT);
        foreach ($bodies as $i => $want) {
            $m = $ch->basic_get($q, true);
            check($m !== null, "basic.get $i: queue empty");
            check_eq(strlen($m->getBody()), strlen($want), "basic.get $i: body size");
            check($m->getBody() === $want, "basic.get $i: body of " . strlen($want) . " bytes differs");
            check_eq($m->get('content_type'), 'application/octet-stream', 'content_type');
        }
        foreach ($bodies as $b) $ch->basic_publish(new AMQPMessage($b), '', $q);
        $ch->wait_for_pending_acks(WAIT);
        $got = [];
        $ctag = $ch->basic_consume($q, '', false, false, false, false, function (AMQPMessage $m) use (&$got) {
            $got[] = $m->getBody();
            $m->ack();
        });
        wait_until($ch, function () use (&$got) { return count($got) >= 2; }, 'two consumed big bodies', 60);
        foreach ($bodies as $i => $want) {
            check_eq(strlen($got[$i]), strlen($want), "consume $i: body size");
            check($got[$i] === $want, "consume $i: body of " . strlen($want) . " bytes differs");
        }
        $ch->basic_cancel($ctag);
        $ch->close();
        check_eq(ready($aux, $q), 0, 'messages left after consuming the big bodies');
        $aux->queue_delete($q);
    });

    step('7 channel error (passive declare of a missing queue -> 404) closes only that channel', function () use ($conn, $aux) {
        $other = $conn->channel();
        $q = declare_queue($other, 'survivor');
        $ch = $conn->channel();
        try {
            $ch->queue_declare(rname('missing'), true);
            throw new StepFailed('passive declare of a missing queue succeeded');
        } catch (AMQPProtocolChannelException $e) {
            check_eq($e->getCode(), 404, 'channel.close reply code');
            check(strpos($e->getMessage(), 'NOT_FOUND') === 0, 'reply text: ' . $e->getMessage());
        }
        check(!$ch->is_open(), 'the failed channel is still open');
        check($conn->isConnected(), 'the connection did not survive a channel error');
        // the channel opened before the error still works
        $other->basic_publish(new AMQPMessage('still here'), '', $q);
        $m = $other->basic_get($q, true);
        check_eq($m ? $m->getBody() : null, 'still here', 'round trip on a channel opened before the error');
        // and a new one works
        $ch2 = $conn->channel();
        $ch2->basic_publish(new AMQPMessage('new channel'), '', $q);
        $m = $ch2->basic_get($q, true);
        check_eq($m ? $m->getBody() : null, 'new channel', 'round trip on a channel opened after the error');
        $ch2->close();
        $other->close();
        $aux->queue_delete($q);
    });

    // Step 8 (consumer cancel notification): bunny only, see the header.

    step('9 30 short connect-publish-get-close cycles; 50 channels on one connection', function () use ($conn, $aux) {
        $q = declare_queue($aux, 'short');
        for ($i = 0; $i < 30; $i++) {   // what a PHP web request does
            $c = connect();
            $ch = $c->channel();
            $body = "short $i " . bin2hex(random_bytes(4));
            $ch->basic_publish(new AMQPMessage($body), '', $q);
            $m = $ch->basic_get($q, true);
            check_eq($m ? $m->getBody() : null, $body, "cycle $i: basic.get after publish");
            $ch->close();
            $c->close();
            check(!$c->isConnected(), "cycle $i: connection not closed");
        }
        for ($i = 0; $i < 50; $i++) {
            $ch = $conn->channel();
            [, $count] = $ch->queue_declare($q, true);
            check_eq($count, 0, "channel $i: passive declare message count");
            $ch->close();
            check(!$ch->is_open(), "channel $i not closed");
        }
        check($conn->isConnected(), 'connection closed after 50 channel open/close');
        check_eq(ready($aux, $q), 0, 'messages left in the short-cycle queue');
        $aux->queue_delete($q);
    });

    step('10 heartbeat 2 s: 7 s idle in wait() with timeouts, then publish', function () use ($aux) {
        // php-amqplib has no heartbeat thread: heartbeats are sent and checked
        // only inside its I/O calls. An idle client that waits in wait() with
        // a timeout gets server heartbeats (that wake it), answers them, and
        // raises AMQPHeartbeatMissedException if nothing arrived for 2 x 2 s.
        $c = connect(['heartbeat' => 2, 'read_write_timeout' => 5.0, 'rpc_timeout' => 5.0]);
        check_eq($c->getHeartbeat(), 2, 'negotiated heartbeat');
        $ch = $c->channel();
        $q = declare_queue($ch, 'heartbeat');
        $t0 = microtime(true);
        $slices = 0;
        while (microtime(true) - $t0 < 7.0) {
            try {
                $ch->wait(null, false, 0.5);
                throw new StepFailed('an unexpected method arrived on an idle channel');
            } catch (AMQPTimeoutException $e) {
                $slices++;   // nothing for the channel: expected
            }
        }
        check($c->isConnected(), 'the connection was closed while idle');
        $ch->basic_publish(new AMQPMessage('after idle'), '', $q);
        $m = $ch->basic_get($q, true);
        check_eq($m ? $m->getBody() : null, 'after idle', 'round trip after 7 s idle');
        $ch->queue_delete($q);
        $ch->close();
        $c->close();
    });

    $STEP = '(close)';
    $aux->close();
    $conn->close();
} catch (Throwable $e) {
    $what = $e instanceof StepFailed ? $e->getMessage() : get_class($e) . ': ' . $e->getMessage()
        . "\n" . $e->getTraceAsString();
    fwrite(STDERR, "php-amqplib features FAILED in step $STEP: $what\n");
    exit(1);
}
echo "php-amqplib features ok\n";
exit(0);
