# Ruby bunny with a 2 s heartbeat idles IDLE seconds (default 7) on an open
# channel, then does a publish + get round trip on the same connection.
# Bunny sends its own heartbeats every second and gives up on the server
# after 2.2 intervals (4.4 s) without a frame from it; automatic recovery is
# off, so a missed server heartbeat fails the script instead of reconnecting.
# Usage: ruby bunny_heartbeat_idle.rb HOST PORT [IDLE]
require 'bunny'
host, port = ARGV[0] || '127.0.0.1', (ARGV[1] || 5673).to_i
idle = (ARGV[2] || 7).to_f
c = Bunny.new(host: host, port: port, heartbeat: 2, automatically_recover: false,
              connection_name: 'bunny-heartbeat-idle')
c.start
raise "negotiated heartbeat #{c.heartbeat}, wanted 2" unless c.heartbeat == 2
ch = c.create_channel
q = ch.queue('', exclusive: false, auto_delete: false, arguments: { 'x-expires' => 60_000 })
sleep idle
raise "connection closed while idle (status #{c.status})" unless c.open? && ch.open?
ch.default_exchange.publish('after idle', routing_key: q.name)
_d, _p, body = q.pop
deadline = Time.now + 5
while body.nil? && Time.now < deadline
  sleep 0.05
  _d, _p, body = q.pop
end
raise "round trip after idle: got #{body.inspect}" unless body == 'after idle'
q.delete
c.close
puts 'bunny heartbeat ok'
