# Ruby bunny (Debian ruby-bunny) feature tour, run through the proxy by
# tests/python/test_ruby_features.py (and directly against RabbitMQ to check
# the program itself).
#
# Usage: ruby bunny_features.rb HOST PORT
# Prints "ok <step>" after each step, "bunny features ok" at the end; on the
# first failure prints "bunny features FAILED in step <step>: ..." on stderr
# and exits 1.
#
# Every queue has a random name and x-expires; exchanges are auto-delete and
# deleted explicitly at the end of their step. Waits for asynchronous events
# (deliveries, returns, cancel notifications) are Queue pops with a timeout.
#
# Step 10 (heartbeats on an idle connection) is not here: it is covered for
# bunny by tests/ruby/bunny_roundtrip.rb and bunny_heartbeat_idle.rb, and by
# tests/php/amqplib_features.php for php-amqplib.
require 'bunny'
require 'securerandom'
require 'set'
require 'timeout'

HOST = ARGV[0] || '127.0.0.1'
PORT = (ARGV[1] || 5672).to_i
SUFFIX = SecureRandom.hex(6)
WAIT = 15 # seconds allowed for any single awaited event

class StepFailed < StandardError; end

def rname(tag)
  "amqproxy-test-bunny-#{tag}-#{SUFFIX}"
end

def show(v)
  v.is_a?(String) && v.bytesize > 64 ? "#{v.bytesize} bytes" : v.inspect
end

def check(cond, msg)
  raise StepFailed, msg unless cond
end

def check_eq(got, want, what)
  raise StepFailed, "#{what}: got #{show(got)}, want #{show(want)}" unless got == want
end

# Pops one item from a Queue filled by a bunny callback thread, or fails.
def take(q, what, secs = WAIT)
  Timeout.timeout(secs) { q.pop }
rescue Timeout::Error
  raise StepFailed, "timed out after #{secs}s waiting for #{what}"
end

def connect(**opts)
  c = Bunny.new(host: HOST, port: PORT, user: 'guest', password: 'guest', vhost: '/',
                automatically_recover: false, connection_timeout: 10,
                continuation_timeout: WAIT * 1000, log_level: :fatal, **opts)
  c.start
  c
end

def declare_queue(ch, tag)
  ch.queue(rname(tag), durable: false, exclusive: false, auto_delete: false,
                       arguments: { 'x-expires' => 120_000 })
end

$step = '(connect)'
def step(name)
  $step = name
  t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  yield
  puts format('ok %-60s %6.2fs', name, Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0)
  $stdout.flush
end

begin
  conn = connect
  aux = conn.create_channel # passive declares and deletes
  ready = ->(q) { aux.queue_declare(q, passive: true).message_count }

  step('1 qos prefetch 3, manual ack, reject/nack requeue, ack multiple') do
    pub = conn.create_channel
    pub.confirm_select
    ch = conn.create_channel
    ch.prefetch(3)
    q = declare_queue(ch, 'qos')
    10.times { |i| pub.default_exchange.publish("m#{i}", routing_key: q.name) }
    check(pub.wait_for_confirms, 'the broker nacked a publish')
    pub.close
    check_eq(ready.(q.name), 10, 'messages in the queue before consuming')

    got = Queue.new
    consumer = q.subscribe(manual_ack: true) { |di, _props, body| got << [di, body] }
    first = Array.new(3) { take(got, 'a delivery (prefetch 3)') }
    check_eq(first.map(&:last), %w[m0 m1 m2], 'first three deliveries')
    check(first.none? { |d, _| d.redelivered? }, 'a first delivery is flagged redelivered')
    # the broker holds back the other 7 while 3 are unacked
    check_eq(ready.(q.name), 7, 'ready messages with 3 unacked under prefetch 3')
    check_eq(got.size, 0, 'deliveries beyond prefetch 3')

    ch.reject(first[0][0].delivery_tag, true)
    d, b = take(got, 'the redelivery after basic.reject(requeue)')
    check_eq([b, d.redelivered?], ['m0', true], '[body, redelivered] after reject(requeue)')
    ch.nack(first[1][0].delivery_tag, false, true)
    d, b = take(got, 'the redelivery after basic.nack(requeue)')
    check_eq([b, d.redelivered?], ['m1', true], '[body, redelivered] after nack(requeue)')
    check_eq(ready.(q.name), 7, 'ready messages after the requeues were redelivered')

    # unacked now: m2, m0 (redelivered), m1 (redelivered); one multiple ack
    # frees all three prefetch slots, so exactly the next three arrive
    last_tag = d.delivery_tag
    [%w[m3 m4 m5], %w[m6 m7 m8], %w[m9]].each do |want|
      ch.ack(last_tag, true)
      batch = Array.new(want.size) { take(got, "#{want.join(',')} after basic.ack(multiple)") }
      check_eq(batch.map(&:last), want, 'deliveries after basic.ack(multiple)')
      check(batch.none? { |dd, _| dd.redelivered? }, 'a new delivery is flagged redelivered')
      last_tag = batch.last[0].delivery_tag
    end
    ch.ack(last_tag, true)
    check_eq(ready.(q.name), 0, 'ready messages after everything was delivered')
    consumer.cancel
    # basic.recover requeues whatever is still unacked on this channel, and a
    # basic.get on the same channel is ordered after it: must find nothing
    ch.recover
    _, _, b = q.pop
    check_eq(b, nil, 'message back in the queue after basic.recover (an ack was lost)')
    check_eq(got.size, 0, 'unexpected extra deliveries')
    ch.close
    aux.queue_delete(q.name)
  end

  step('2 publisher confirms: 500 publishes, wait_for_confirms, all acked') do
    ch = conn.create_channel
    acked = Set.new
    nacked = []
    ch.confirm_select(lambda { |tag, multiple, nack|
      tags = multiple ? (1..tag).to_a : [tag]
      nack ? nacked.concat(tags) : acked.merge(tags)
    })
    q = declare_queue(ch, 'confirms')
    500.times { |i| ch.default_exchange.publish("c#{i}", routing_key: q.name) }
    check(ch.wait_for_confirms, "wait_for_confirms: nacked #{ch.nacked_set.to_a.first(10)}")
    check(ch.unconfirmed_set.empty?, "unconfirmed after wait_for_confirms: #{ch.unconfirmed_set.size}")
    check(nacked.empty? && ch.nacked_set.empty?, "nacked: #{nacked.first(10)}")
    check_eq(acked, Set.new(1..500), 'the set of acked publish sequence numbers')
    check_eq(ready.(q.name), 500, 'messages in the queue after 500 confirmed publishes')
    ch.close
    aux.queue_delete(q.name)
  end

  step('3 mandatory unroutable publish -> basic.return 312 NO_ROUTE (on_return)') do
    ch = conn.create_channel
    returns = Queue.new
    returns_at_ack = nil
    ch.confirm_select(->(_tag, _multiple, _nack) { returns_at_ack ||= returns.size })
    x = ch.default_exchange
    x.on_return { |ri, props, body| returns << [ri, props, body] }
    rk = rname('nowhere')
    x.publish('unroutable body', routing_key: rk, mandatory: true, message_id: 'ret-1')
    ri, props, body = take(returns, 'basic.return of the mandatory publish')
    check_eq(ri.reply_code, 312, 'basic.return reply_code')
    check_eq(ri.reply_text, 'NO_ROUTE', 'basic.return reply_text')
    check_eq([ri.exchange, ri.routing_key], ['', rk], 'basic.return exchange and routing key')
    check_eq([body, props.message_id], ['unroutable body', 'ret-1'], 'returned body and message_id')
    check(ch.wait_for_confirms, 'the returned message was nacked')
    check_eq(returns_at_ack, 1, 'returns received before the publisher ack (must be 1: return precedes ack)')
    ch.close
  end

  step('4 tx select / rollback / commit') do
    ch = conn.create_channel
    q = declare_queue(ch, 'tx')
    ch.tx_select
    ch.default_exchange.publish('rolled back', routing_key: q.name)
    check_eq(ready.(q.name), 0, 'uncommitted publish visible in the queue')
    ch.tx_rollback
    check_eq(ready.(q.name), 0, 'messages after tx.rollback')
    ch.default_exchange.publish('committed-1', routing_key: q.name)
    ch.default_exchange.publish('committed-2', routing_key: q.name)
    ch.tx_commit
    check_eq(ready.(q.name), 2, 'messages after tx.commit')
    # acks are transactional too: a rolled-back ack leaves the messages
    # unacked, so closing the channel requeues both
    _, _, b1 = q.pop(manual_ack: true)
    di2, _, b2 = q.pop(manual_ack: true)
    check_eq([b1, b2], %w[committed-1 committed-2], 'bodies of the committed messages')
    ch.ack(di2.delivery_tag, true)
    ch.tx_rollback
    ch.close
    ch = conn.create_channel
    ch.tx_select
    got = Queue.new
    q = ch.queue(q.name, passive: true)
    consumer = q.subscribe(manual_ack: true) { |di, _p, body| got << [di, body] }
    back = Array.new(2) { take(got, 'the messages whose ack was rolled back') }
    check_eq(back.map { |d, b| [b, d.redelivered?] }, [['committed-1', true], ['committed-2', true]],
             '[body, redelivered] of the messages whose ack was rolled back')
    consumer.cancel
    # a committed ack of the first and a committed reject(requeue) of the second
    ch.ack(back[0][0].delivery_tag, false)
    ch.reject(back[1][0].delivery_tag, true)
    check_eq(ready.(q.name), 0, 'ready messages before tx.commit of a reject(requeue)')
    ch.tx_commit
    _, _, b = q.pop
    check_eq(b, 'committed-2', 'the message rejected (requeue) in the committed transaction')
    _, _, b = q.pop
    check_eq(b, nil, 'a message left after the committed ack')
    ch.close
    aux.queue_delete(q.name)
  end

  step('5 topic and headers exchange routing, exchange-to-exchange binding') do
    ch = conn.create_channel
    ch.confirm_select
    drain = lambda do |q|
      out = []
      loop do
        _, props, body = q.pop
        break unless body
        out << [body, props.headers]
      end
      out.map(&:first)
    end

    tx = ch.topic(rname('topic'), auto_delete: true)
    qa = declare_queue(ch, 'topic-a').bind(tx, routing_key: 'a.*.c')
    qb = declare_queue(ch, 'topic-b').bind(tx, routing_key: 'a.#')
    %w[a.b.c a.x z.z a.b.c.d].each { |rk| tx.publish("t:#{rk}", routing_key: rk) }
    check(ch.wait_for_confirms, 'topic publishes nacked')
    check_eq(drain.(qa), %w[t:a.b.c], 'queue bound with a.*.c received')
    check_eq(drain.(qb), %w[t:a.b.c t:a.x t:a.b.c.d], 'queue bound with a.# received')

    hx = ch.headers(rname('headers'), auto_delete: true)
    qall = declare_queue(ch, 'hdr-all').bind(hx, arguments: { 'x-match' => 'all', 'k1' => 'v1', 'k2' => 'v2' })
    qany = declare_queue(ch, 'hdr-any').bind(hx, arguments: { 'x-match' => 'any', 'k1' => 'v1', 'k3' => 'v3' })
    [['h12', { 'k1' => 'v1', 'k2' => 'v2' }], ['h3', { 'k3' => 'v3' }],
     ['h2', { 'k2' => 'v2' }], ['h1x', { 'k1' => 'v1', 'k2' => 'other' }]].each do |body, h|
      hx.publish(body, headers: h)
    end
    check(ch.wait_for_confirms, 'headers publishes nacked')
    check_eq(drain.(qall), %w[h12], 'x-match=all queue received')
    check_eq(drain.(qany), %w[h12 h3 h1x], 'x-match=any queue received')

    src = ch.direct(rname('e2e-src'), auto_delete: true)
    dst = ch.fanout(rname('e2e-dst'), auto_delete: true)
    dst.bind(src, routing_key: 'rk')
    dst.bind(src, routing_key: 'keep') # src is auto-delete: keeps it alive after the unbind below
    qd = declare_queue(ch, 'e2e').bind(dst)
    src.publish('via e2e', routing_key: 'rk')
    src.publish('not bound', routing_key: 'other')
    check(ch.wait_for_confirms, 'e2e publishes nacked')
    check_eq(drain.(qd), ['via e2e'], 'queue behind the exchange-to-exchange binding received')
    dst.unbind(src, routing_key: 'rk')
    src.publish('after unbind', routing_key: 'rk')
    check(ch.wait_for_confirms, 'publish after unbind nacked')
    check_eq(drain.(qd), [], 'queue behind a removed exchange-to-exchange binding received')

    [qa, qb, qall, qany, qd].each { |q| aux.queue_delete(q.name) }
    [tx, hx, src, dst].each { |x| aux.exchange_delete(x.name) }
    ch.close
  end

  step('6 1 MiB and 4 MiB bodies byte-exact via basic.get and via consume') do
    ch = conn.create_channel
    ch.confirm_select
    q = declare_queue(ch, 'big')
    bodies = [Random.new.bytes(1 << 20), Random.new.bytes(4 << 20)]
    bodies.each { |b| ch.default_exchange.publish(b, routing_key: q.name, content_type: 'application/octet-stream') }
    check(ch.wait_for_confirms, 'big publishes nacked')
    bodies.each_with_index do |want, i|
      _, props, got = q.pop
      check(got, "basic.get #{i}: queue empty")
      check_eq(got.bytesize, want.bytesize, "basic.get #{i}: body size")
      check(got == want, "basic.get #{i}: body of #{want.bytesize} bytes differs")
      check_eq(props.content_type, 'application/octet-stream', 'content_type')
    end
    bodies.each { |b| ch.default_exchange.publish(b, routing_key: q.name) }
    check(ch.wait_for_confirms, 'big publishes nacked')
    got = Queue.new
    consumer = q.subscribe(manual_ack: true) { |di, _p, body| got << body; ch.ack(di.delivery_tag) }
    bodies.each_with_index do |want, i|
      b = take(got, "consumed big body #{i}", 60)
      check_eq(b.bytesize, want.bytesize, "consume #{i}: body size")
      check(b == want, "consume #{i}: body of #{want.bytesize} bytes differs")
    end
    consumer.cancel
    ch.close
    check_eq(ready.(q.name), 0, 'messages left after consuming the big bodies')
    aux.queue_delete(q.name)
  end

  step('7 channel error (passive declare of a missing queue -> 404) closes only that channel') do
    other = conn.create_channel
    q = declare_queue(other, 'survivor')
    ch = conn.create_channel
    begin
      ch.queue_declare(rname('missing'), passive: true)
      raise StepFailed, 'passive declare of a missing queue succeeded'
    rescue Bunny::NotFound => e
      check_eq(e.channel_close.reply_code, 404, 'channel.close reply_code')
      check(e.channel_close.reply_text.start_with?('NOT_FOUND'), "reply_text #{e.channel_close.reply_text}")
    end
    check(ch.closed?, 'the failed channel is still open')
    check(conn.open?, 'the connection did not survive a channel error')
    # the channel opened before the error still works
    other.default_exchange.publish('still here', routing_key: q.name)
    _, _, b = q.pop
    check_eq(b, 'still here', 'round trip on a channel opened before the error')
    # and a new one works
    ch2 = conn.create_channel
    ch2.default_exchange.publish('new channel', routing_key: q.name)
    _, _, b = ch2.basic_get(q.name, manual_ack: false)
    check_eq(b, 'new channel', 'round trip on a channel opened after the error')
    ch2.close
    other.close
    aux.queue_delete(q.name)
  end

  step('8 consumer cancel notification when the queue is deleted (on_cancellation)') do
    ch = conn.create_channel
    q = declare_queue(ch, 'cancel')
    cancels = Queue.new
    consumer = q.subscribe(manual_ack: false, on_cancellation: ->(bc) { cancels << bc }) { |*_| }
    aux.queue_delete(q.name)
    bc = take(cancels, 'basic.cancel from the broker')
    check_eq(bc.consumer_tag, consumer.consumer_tag, 'consumer tag of the basic.cancel')
    check(ch.open?, 'the channel was closed by the cancel')
    check(!ch.consumers.key?(consumer.consumer_tag), 'the cancelled consumer is still registered')
    # the channel is still usable
    q2 = declare_queue(ch, 'after-cancel')
    ch.default_exchange.publish('after cancel', routing_key: q2.name)
    _, _, b = q2.pop
    check_eq(b, 'after cancel', 'round trip on the channel after the cancel')
    aux.queue_delete(q2.name)
    ch.close
  end

  step('9 30 short connect-publish-get-close cycles; 50 channels on one connection') do
    qn = rname('short')
    aux.queue_declare(qn, arguments: { 'x-expires' => 120_000 })
    30.times do |i|
      c = connect
      ch = c.create_channel
      body = "short #{i} #{SecureRandom.hex(4)}"
      ch.default_exchange.publish(body, routing_key: qn)
      _, _, got = ch.basic_get(qn, manual_ack: false)
      check_eq(got, body, "cycle #{i}: basic.get after publish")
      c.close
      check(c.closed?, "cycle #{i}: connection not closed")
    end
    ids = []
    50.times do |i|
      ch = conn.create_channel
      ids << ch.id
      check_eq(ch.queue_declare(qn, passive: true).message_count, 0, "channel #{i}: passive declare")
      ch.close
      check(ch.closed?, "channel #{i} not closed")
    end
    check(conn.open?, 'connection closed after 50 channel open/close')
    check_eq(ready.(qn), 0, 'messages left in the short-cycle queue')
    aux.queue_delete(qn)
  end

  $step = '(close)'
  aux.close
  conn.close
rescue StepFailed => e
  warn "bunny features FAILED in step #{$step}: #{e.message}"
  exit 1
rescue Exception => e # rubocop:disable Lint/RescueException
  warn "bunny features FAILED in step #{$step}: #{e.class}: #{e.message}"
  warn e.backtrace.first(8).join("\n")
  exit 1
end
puts 'bunny features ok'
