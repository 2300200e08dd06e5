<?php
// php-amqp extension (Debian package php-amqp, librabbitmq-based; classes
// AMQPConnection / AMQPChannel / AMQPExchange / AMQPQueue) feature tour, run
// through the proxy by tests/python/test_php_features.py (and directly
// against RabbitMQ to check the program itself).
//
// usage: php ext_amqp_features.php HOST PORT
// Prints "ok <step>" after each step and "php-amqp features ok" at the end;
// on the first failure prints "php-amqp features FAILED in step <step>: ..."
// on stderr and exits 1.
//
// Queues have random names and x-expires; exchanges are auto-delete and are
// deleted at the end of their step. Asynchronous events are awaited inside
// the extension's blocking calls (consume, waitForConfirm,
// waitForBasicReturn), bounded by the connection's read_timeout / the
// calls' timeout argument, never with a sleep.
//
// Not here:
// - step 8 (consumer cancel notification): bunny only in this suite;
// - step 10 (heartbeats on an idle connection): librabbitmq answers
//   heartbeats only while the script is blocked inside an extension call
//   and php-amqp has no call that idles while servicing them, so an idle
//   test would only measure the script's sleep; covered by
//   tests/php/amqplib_features.php for php-amqplib.

error_reporting(E_ALL);
set_error_handler(function ($no, $str, $file, $line) {
    if (!(error_reporting() & $no)) return false;   // @-silenced
    throw new ErrorException($str, 0, $no, $file, $line);
});
if (!extension_loaded('amqp')) {
    fwrite(STDERR, "php-amqp features FAILED in step (setup): php-amqp extension not loaded (apt-get install php-amqp)\n");
    exit(1);
}

const WAIT = 15;   // seconds allowed for any single awaited event (read_timeout)

class StepFailed extends Exception {}

$HOST = $argv[1] ?? '127.0.0.1';
$PORT = (int)($argv[2] ?? 5672);
$SUFFIX = bin2hex(random_bytes(6));

function rname(string $tag): string {
    global $SUFFIX;
    return "amqproxy-test-ext-amqp-$tag-$SUFFIX";
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

function connect(): AMQPConnection {
    global $HOST, $PORT;
    $c = new AMQPConnection([
        'host' => $HOST, 'port' => $PORT, 'vhost' => '/', 'login' => 'guest', 'password' => 'guest',
        'connect_timeout' => 10, 'read_timeout' => WAIT, 'write_timeout' => WAIT, 'rpc_timeout' => WAIT,
    ]);
    $c->connect();
    return $c;
}

function declare_queue(AMQPChannel $ch, string $tag): AMQPQueue {
    $q = new AMQPQueue($ch);
    $q->setName(rname($tag));
    $q->setFlags(AMQP_NOPARAM);   // the extension's default is AMQP_AUTODELETE
    $q->setArguments(['x-expires' => 120000]);
    $q->declareQueue();
    return $q;
}

/** Ready messages of a queue (passive declare on $ch). */
function ready(AMQPChannel $ch, string $name): int {
    $q = new AMQPQueue($ch);
    $q->setName($name);
    $q->setFlags(AMQP_PASSIVE);
    return $q->declareQueue();
}

function default_exchange(AMQPChannel $ch): AMQPExchange {
    return new AMQPExchange($ch);
}

function exchange(AMQPChannel $ch, string $name, string $type): AMQPExchange {
    $x = new AMQPExchange($ch);
    $x->setName($name);
    $x->setType($type);
    $x->setFlags(AMQP_AUTODELETE);
    $x->declareExchange();
    return $x;
}

/** Waits (inside consume, bounded by read_timeout) for $n deliveries to the
 *  consumers already started on $q's channel. */
function take(AMQPQueue $q, int $n, string $what): array {
    $got = [];
    try {
        $q->consume(function (AMQPEnvelope $e) use (&$got, $n) {
            $got[] = $e;
            return count($got) < $n;
        }, AMQP_JUST_CONSUME);
    } catch (AMQPException $e) {
        throw new StepFailed("waiting for $what (got " . count($got) . " of $n): " . get_class($e) . ': ' . $e->getMessage());
    }
    return $got;
}

/** basic.get (auto-ack) until the queue is empty; the bodies. */
function drain(AMQPQueue $q): array {
    $out = [];
    while (($e = $q->get(AMQP_AUTOACK)) instanceof AMQPEnvelope) $out[] = $e->getBody();
    return $out;
}

/** Publisher confirms on a channel: counts publishes, waits until every one
 *  of them is confirmed, fails on a nack. */
class Confirms {
    public $published = 0;
    public $acked = [];
    public $nacked = [];
    private $ch;

    public function __construct(AMQPChannel $ch) {
        $this->ch = $ch;
        $ch->confirmSelect();
        $ch->setConfirmCallback(
            function ($tag, $multiple) { $this->mark($this->acked, $tag, $multiple); return !$this->done(); },
            function ($tag, $multiple, $requeue) { $this->mark($this->nacked, $tag, $multiple); return false; }
        );
    }

    private function mark(array &$set, int $tag, bool $multiple): void {
        foreach ($multiple ? range(1, $tag) : [$tag] as $t) {
            if (!isset($this->acked[$t]) && !isset($this->nacked[$t])) $set[$t] = true;
        }
    }

    private function done(): bool {
        return count($this->acked) + count($this->nacked) >= $this->published;
    }

    public function publish(AMQPExchange $x, string $body, string $rk = '', int $flags = AMQP_NOPARAM, array $attrs = []): void {
        $x->publish($body, $rk, $flags, $attrs);
        $this->published++;
    }

    public function wait(): void {
        if (!$this->done()) {
            try {
                $this->ch->waitForConfirm(WAIT);
            } catch (AMQPException $e) {
                throw new StepFailed(sprintf('waitForConfirm: %d of %d confirmed: %s: %s', count($this->acked),
                                             $this->published, get_class($e), $e->getMessage()));
            }
        }
        check(!$this->nacked, 'nacked publishes: ' . json_encode(array_keys($this->nacked)));
        check_eq(count($this->acked), $this->published, 'acked publishes');
        $keys = array_keys($this->acked); sort($keys); check_eq($keys, range(1, $this->published), "acked sequence numbers");
    }
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
    $aux = new AMQPChannel($conn);   // passive declares and deletes

    step('1 qos prefetch 3, manual ack, reject/nack requeue, ack multiple', function () use ($conn, $aux) {
        $pub = new AMQPChannel($conn);
        $confirms = new Confirms($pub);
        $ch = new AMQPChannel($conn);
        $ch->qos(0, 3);
        check_eq($ch->getPrefetchCount(), 3, 'prefetch count');
        $q = declare_queue($ch, 'qos');
        for ($i = 0; $i < 10; $i++) $confirms->publish(default_exchange($pub), "m$i", $q->getName());
        $confirms->wait();
        $pub->close();
        check_eq(ready($aux, $q->getName()), 10, 'messages in the queue before consuming');

        $q->consume(null, AMQP_NOPARAM);   // basic.consume only (manual ack)
        $ctag = $q->getConsumerTag();
        $bodies = function (array $es) { return array_map(function ($e) { return $e->getBody(); }, $es); };
        $redelivered = function (array $es) { return array_map(function ($e) { return $e->isRedelivery(); }, $es); };

        $first = take($q, 3, 'three deliveries (prefetch 3)');
        check_eq($bodies($first), ['m0', 'm1', 'm2'], 'first three deliveries');
        check_eq($redelivered($first), [false, false, false], 'redelivered flags of the first deliveries');
        // the broker holds back the other 7 while 3 are unacked
        check_eq(ready($aux, $q->getName()), 7, 'ready messages with 3 unacked under prefetch 3');

        $q->reject($first[0]->getDeliveryTag(), AMQP_REQUEUE);
        [$e] = take($q, 1, 'the redelivery after basic.reject(requeue)');
        check_eq([$e->getBody(), $e->isRedelivery()], ['m0', true], '[body, redelivered] after reject(requeue)');
        $q->nack($first[1]->getDeliveryTag(), AMQP_REQUEUE);
        [$e] = take($q, 1, 'the redelivery after basic.nack(requeue)');
        check_eq([$e->getBody(), $e->isRedelivery()], ['m1', true], '[body, redelivered] after nack(requeue)');
        check_eq(ready($aux, $q->getName()), 7, 'ready messages after the requeues were redelivered');

        // unacked now: m2, m0 and m1 (redelivered); one multiple ack frees all
        // three prefetch slots, so exactly the next three arrive
        $last = $e->getDeliveryTag();
        foreach ([['m3', 'm4', 'm5'], ['m6', 'm7', 'm8'], ['m9']] as $want) {
            $q->ack($last, AMQP_MULTIPLE);
            $batch = take($q, count($want), implode(',', $want) . ' after basic.ack(multiple)');
            check_eq($bodies($batch), $want, 'deliveries after basic.ack(multiple)');
            check(!in_array(true, $redelivered($batch), true), 'a new delivery is flagged redelivered');
            $last = end($batch)->getDeliveryTag();
        }
        $q->ack($last, AMQP_MULTIPLE);
        check_eq(ready($aux, $q->getName()), 0, 'ready messages after everything was delivered');
        $q->cancel($ctag);
        // basic.recover requeues whatever is still unacked on this channel, and
        // a basic.get on the same channel is ordered after it: must find nothing
        $ch->basicRecover(true);
        $e = $q->get(AMQP_AUTOACK);
        check_eq($e ? $e->getBody() : null, null, 'message back in the queue after basic.recover (an ack was lost)');
        $ch->close();
        $qa = new AMQPQueue($aux);
        $qa->setName($q->getName());
        $qa->delete();
    });

    step('2 publisher confirms: 500 publishes, waitForConfirm, all acked', function () use ($conn, $aux) {
        $ch = new AMQPChannel($conn);
        $confirms = new Confirms($ch);
        $q = declare_queue($ch, 'confirms');
        $x = default_exchange($ch);
        for ($i = 0; $i < 500; $i++) $confirms->publish($x, "c$i", $q->getName());
        $confirms->wait();   // all 500 acked, sequence numbers 1..500
        check_eq(ready($aux, $q->getName()), 500, 'messages in the queue after 500 confirmed publishes');
        $q->delete();
        $ch->close();
    });

    step('3 mandatory unroutable publish -> basic.return 312 NO_ROUTE (setReturnCallback)', function () use ($conn) {
        $rk = rname('nowhere');
        // (a) a plain channel: waitForBasicReturn
        $ch = new AMQPChannel($conn);
        $returns = [];
        $ch->setReturnCallback(function ($code, $text, $exchange, $routing_key, AMQPBasicProperties $p, $body) use (&$returns) {
            $returns[] = [$code, $text, $exchange, $routing_key, $body, $p->getMessageId()];
            return false;   // stop waiting
        });
        default_exchange($ch)->publish('unroutable body', $rk, AMQP_MANDATORY, ['message_id' => 'ret-1']);
        try {
            $ch->waitForBasicReturn(WAIT);
        } catch (AMQPException $e) {
            throw new StepFailed('waitForBasicReturn: ' . get_class($e) . ': ' . $e->getMessage());
        }
        check_eq($returns, [[312, 'NO_ROUTE', '', $rk, 'unroutable body', 'ret-1']],
                 '[code, text, exchange, routing key, body, message_id] of the return');
        $ch->close();

        // (b) with confirms: the return arrives before the ack of the same publish
        $ch = new AMQPChannel($conn);
        $confirms = new Confirms($ch);
        $returns = [];
        $ch->setReturnCallback(function ($code, $text, $exchange, $routing_key, AMQPBasicProperties $p, $body) use (&$returns, $confirms) {
            $returns[] = [$code, $text, $body, count($confirms->acked)];
            return true;   // keep waiting for the ack
        });
        $confirms->publish(default_exchange($ch), 'unroutable 2', $rk, AMQP_MANDATORY);
        $confirms->wait();
        check_eq($returns, [[312, 'NO_ROUTE', 'unroutable 2', 0]], '[code, text, body, acks before it] of the return');
        $ch->close();
    });

    step('4 tx select / rollback / commit', function () use ($conn, $aux) {
        $ch = new AMQPChannel($conn);
        $q = declare_queue($ch, 'tx');
        $name = $q->getName();
        $x = default_exchange($ch);
        $ch->startTransaction();
        $x->publish('rolled back', $name);
        check_eq(ready($aux, $name), 0, 'uncommitted publish visible in the queue');
        $ch->rollbackTransaction();
        check_eq(ready($aux, $name), 0, 'messages after tx.rollback');
        $x->publish('committed-1', $name);
        $x->publish('committed-2', $name);
        $ch->commitTransaction();
        check_eq(ready($aux, $name), 2, 'messages after tx.commit');
        // acks are transactional too: a rolled-back ack leaves the messages
        // unacked, so closing the channel requeues both
        $e1 = $q->get();
        $e2 = $q->get();
        check($e1 instanceof AMQPEnvelope && $e2 instanceof AMQPEnvelope, 'basic.get found no message');
        check_eq([$e1->getBody(), $e2->getBody()], ['committed-1', 'committed-2'], 'bodies of the committed messages');
        $q->ack($e2->getDeliveryTag(), AMQP_MULTIPLE);
        $ch->rollbackTransaction();
        $ch->close();
        $ch = new AMQPChannel($conn);
        $q = new AMQPQueue($ch);
        $q->setName($name);
        $ch->startTransaction();
        $q->consume(null, AMQP_NOPARAM);
        $back = take($q, 2, 'the messages whose ack was rolled back');
        check_eq(array_map(function ($e) { return [$e->getBody(), $e->isRedelivery()]; }, $back),
                 [['committed-1', true], ['committed-2', true]],
                 '[body, redelivered] of the messages whose ack was rolled back');
        $q->cancel($q->getConsumerTag());
        // a committed ack of the first and a committed reject(requeue) of the second
        $q->ack($back[0]->getDeliveryTag());
        $q->reject($back[1]->getDeliveryTag(), AMQP_REQUEUE);
        check_eq(ready($aux, $name), 0, 'ready messages before tx.commit of a reject(requeue)');
        $ch->commitTransaction();
        $e = $q->get(AMQP_AUTOACK);
        check_eq($e ? $e->getBody() : null, 'committed-2', 'the message rejected (requeue) in the committed transaction');
        $e = $q->get(AMQP_AUTOACK);
        check_eq($e ? $e->getBody() : null, null, 'a message left after the committed ack');
        $ch->close();
        $qa = new AMQPQueue($aux);
        $qa->setName($name);
        $qa->delete();
    });

    step('5 topic and headers exchange routing, exchange-to-exchange binding', function () use ($conn) {
        $ch = new AMQPChannel($conn);
        $confirms = new Confirms($ch);

        $tx = exchange($ch, rname('topic'), AMQP_EX_TYPE_TOPIC);
        $qa = declare_queue($ch, 'topic-a');
        $qb = declare_queue($ch, 'topic-b');
        $qa->bind($tx->getName(), 'a.*.c');
        $qb->bind($tx->getName(), 'a.#');
        foreach (['a.b.c', 'a.x', 'z.z', 'a.b.c.d'] as $rk) $confirms->publish($tx, "t:$rk", $rk);
        $confirms->wait();
        check_eq(drain($qa), ['t:a.b.c'], 'queue bound with a.*.c received');
        check_eq(drain($qb), ['t:a.b.c', 't:a.x', 't:a.b.c.d'], 'queue bound with a.# received');

        $hx = exchange($ch, rname('headers'), AMQP_EX_TYPE_HEADERS);
        $qall = declare_queue($ch, 'hdr-all');
        $qany = declare_queue($ch, 'hdr-any');
        $qall->bind($hx->getName(), '', ['x-match' => 'all', 'k1' => 'v1', 'k2' => 'v2']);
        $qany->bind($hx->getName(), '', ['x-match' => 'any', 'k1' => 'v1', 'k3' => 'v3']);
        foreach ([['h12', ['k1' => 'v1', 'k2' => 'v2']], ['h3', ['k3' => 'v3']],
                  ['h2', ['k2' => 'v2']], ['h1x', ['k1' => 'v1', 'k2' => 'other']]] as [$body, $h]) {
            $confirms->publish($hx, $body, '', AMQP_NOPARAM, ['headers' => $h]);
        }
        $confirms->wait();
        check_eq(drain($qall), ['h12'], 'x-match=all queue received');
        check_eq(drain($qany), ['h12', 'h3', 'h1x'], 'x-match=any queue received');

        $src = exchange($ch, rname('e2e-src'), AMQP_EX_TYPE_DIRECT);
        $dst = exchange($ch, rname('e2e-dst'), AMQP_EX_TYPE_FANOUT);
        $dst->bind($src->getName(), 'rk');
        $dst->bind($src->getName(), 'keep');   // src is auto-delete: keeps it alive after the unbind below
        $qd = declare_queue($ch, 'e2e');
        $qd->bind($dst->getName(), '');
        $confirms->publish($src, 'via e2e', 'rk');
        $confirms->publish($src, 'not bound', 'other');
        $confirms->wait();
        check_eq(drain($qd), ['via e2e'], 'queue behind the exchange-to-exchange binding received');
        $dst->unbind($src->getName(), 'rk');
        $confirms->publish($src, 'after unbind', 'rk');
        $confirms->wait();
        check_eq(drain($qd), [], 'queue behind a removed exchange-to-exchange binding received');

        foreach ([$qa, $qb, $qall, $qany, $qd] as $q) $q->delete();
        foreach ([$tx, $hx, $src, $dst] as $x) $x->delete();
        $ch->close();
    });

    step('6 1 MiB and 4 MiB bodies byte-exact via basic.get and via consume', function () use ($conn, $aux) {
        $ch = new AMQPChannel($conn);
        $confirms = new Confirms($ch);
        $q = declare_queue($ch, 'big');
        $x = default_exchange($ch);
        $bodies = [random_bytes(1 << 20), random_bytes(4 << 20)];
        foreach ($bodies as $b) $confirms->publish($x, $b, $q->getName(), AMQP_NOPARAM, ['content_type' => 'application/octet-stream']);
        $confirms->wait();
        foreach ($bodies as $i => $want) {
            $e = $q->get(AMQP_AUTOACK);
            check($e instanceof AMQPEnvelope, "basic.get $i: queue empty");
            check_eq(strlen($e->getBody()), strlen($want), "basic.get $i: body size");
            check($e->getBody() === $want, "basic.get $i: body of " . strlen($want) . " bytes differs");
            check_eq($e->getContentType(), 'application/octet-stream', 'content_type');
        }
        foreach ($bodies as $b) $confirms->publish($x, $b, $q->getName());
        $confirms->wait();
        $q->consume(null, AMQP_NOPARAM);
        $got = take($q, 2, 'two consumed big bodies');
        foreach ($bodies as $i => $want) {
            check_eq(strlen($got[$i]->getBody()), strlen($want), "consume $i: body size");
            check($got[$i]->getBody() === $want, "consume $i: body of " . strlen($want) . " bytes differs");
        }
        $q->ack($got[1]->getDeliveryTag(), AMQP_MULTIPLE);
        $q->cancel($q->getConsumerTag());
        $ch->close();
        check_eq(ready($aux, $q->getName()), 0, 'messages left after consuming the big bodies');
        $qa = new AMQPQueue($aux);
        $qa->setName($q->getName());
        $qa->delete();
    });

    step('7 channel error (passive declare of a missing queue -> 404) closes only that channel', function () use ($conn) {
        $other = new AMQPChannel($conn);
        $q = declare_queue($other, 'survivor');
        $ch = new AMQPChannel($conn);
        try {
            ready($ch, rname('missing'));
            throw new StepFailed('passive declare of a missing queue succeeded');
        } catch (AMQPQueueException $e) {
            check_eq($e->getCode(), 404, 'channel error code (' . $e->getMessage() . ')');
            check(strpos($e->getMessage(), 'NOT_FOUND') !== false, 'error message: ' . $e->getMessage());
        }
        // the channel object is unusable now; the connection is not
        check(!$ch->isConnected(), 'the failed channel still reports connected');
        check($conn->isConnected(), 'the connection did not survive a channel error');
        try {
            ready($ch, $q->getName());
            throw new StepFailed('the failed channel still accepted a declare');
        } catch (AMQPChannelException $e) {
            // "Could not create queue. No channel available." or similar
        }
        // the channel opened before the error still works
        default_exchange($other)->publish('still here', $q->getName());
        $e = $q->get(AMQP_AUTOACK);
        check_eq($e ? $e->getBody() : null, 'still here', 'round trip on a channel opened before the error');
        // and a new one on the same connection works
        $ch2 = new AMQPChannel($conn);
        default_exchange($ch2)->publish('new channel', $q->getName());
        $q2 = new AMQPQueue($ch2);
        $q2->setName($q->getName());
        $e = $q2->get(AMQP_AUTOACK);
        check_eq($e ? $e->getBody() : null, 'new channel', 'round trip on a channel opened after the error');
        $q2->delete();
        $ch2->close();
        $other->close();
    });

    // Step 8 (consumer cancel notification): bunny only, see the header.

    step('9 30 short connect-publish-get-close cycles; 50 channels on one connection', function () use ($conn, $aux) {
        $name = declare_queue($aux, 'short')->getName();
        for ($i = 0; $i < 30; $i++) {   // what a PHP web request does
            $c = connect();
            $ch = new AMQPChannel($c);
            $body = "short $i " . bin2hex(random_bytes(4));
            default_exchange($ch)->publish($body, $name);
            $q = new AMQPQueue($ch);
            $q->setName($name);
            $e = $q->get(AMQP_AUTOACK);
            check_eq($e ? $e->getBody() : null, $body, "cycle $i: basic.get after publish");
            $c->disconnect();
            check(!$c->isConnected(), "cycle $i: connection not closed");
        }
        $before = $conn->getUsedChannels();
        for ($i = 0; $i < 50; $i++) {
            $ch = new AMQPChannel($conn);
            check_eq(ready($ch, $name), 0, "channel $i: passive declare message count");
            $ch->close();
            check(!$ch->isConnected(), "channel $i not closed");
        }
        check_eq($conn->getUsedChannels(), $before, 'channels in use after 50 open/close');
        check($conn->isConnected(), 'connection closed after 50 channel open/close');
        check_eq(ready($aux, $name), 0, 'messages left in the short-cycle queue');
        $qa = new AMQPQueue($aux);
        $qa->setName($name);
        $qa->delete();
    });

    // Step 10 (heartbeats): php-amqplib only, see the header.

    $STEP = '(close)';
    $conn->disconnect();
} catch (Throwable $e) {
    $what = $e instanceof StepFailed ? $e->getMessage() : get_class($e) . ' (code ' . $e->getCode() . '): '
        . $e->getMessage() . "\n" . $e->getTraceAsString();
    fwrite(STDERR, "php-amqp features FAILED in step $STEP: $what\n");
    exit(1);
}
echo "php-amqp features ok\n";
exit(0);
