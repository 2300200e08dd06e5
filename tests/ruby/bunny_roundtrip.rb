# Ruby bunny through the proxy: frame_max 4096, confirms, a 300 kB body,
# a manual-ack consumer, and 5 s idle with 2 s heartbeats. Usage: ruby bunny_roundtrip.rb HOST PORT
require 'bunny'
host, port = ARGV[0] || '127.0.0.1', (ARGV[1] || 5673).to_i
c = Bunny.new(host: host, port: port, frame_max: 4096, heartbeat: 2)
c.start
ch = c.create_channel
ch.confirm_select
q = ch.queue('', exclusive: false, auto_delete: true)
body = Random.new.bytes(300_000)
ch.default_exchange.publish(body, routing_key: q.name, headers: {'a' => 1})
ch.wait_for_confirms or raise 'nack'
d, p, b = q.pop
raise 'mismatch' unless b == body && p.headers['a'] == 1
got = []
q.subscribe(manual_ack: true) { |di, pr, bo| got << bo; ch.ack(di.delivery_tag) }
3.times { |i| ch.default_exchange.publish("m#{i}", routing_key: q.name) }
t = Time.now; sleep 0.05 while got.size < 3 && Time.now - t < 5
raise "consume #{got}" unless got == %w[m0 m1 m2]
sleep 5 # idle with heartbeat 2s: the connection must survive
ch2 = c.create_channel; ch2.close
c.close
puts 'bunny ok'
