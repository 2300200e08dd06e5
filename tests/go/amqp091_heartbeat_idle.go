// The Go client (rabbitmq/amqp091-go) with a 2 s heartbeat idles IDLE
// seconds (default 7) on an open channel, then does a publish + get round
// trip. amqp091-go sends a heartbeat every second when it has sent nothing
// and sets a read deadline of 3 s: a server that sends nothing for 3 s
// closes the connection (reported on NotifyClose).
// Usage: go run amqp091_heartbeat_idle.go HOST PORT [IDLE_SECONDS]
package main

import (
	"fmt"
	"os"
	"strconv"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

func fail(f string, a ...interface{}) {
	fmt.Printf(f+"\n", a...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 3 {
		fail("usage: amqp091_heartbeat_idle HOST PORT [IDLE_SECONDS]")
	}
	idle := 7.0
	if len(os.Args) > 3 {
		v, err := strconv.ParseFloat(os.Args[3], 64)
		if err != nil {
			fail("bad idle %q", os.Args[3])
		}
		idle = v
	}
	cfg := amqp.Config{Heartbeat: 2 * time.Second, Properties: amqp.Table{"connection_name": "go-heartbeat-idle"}}
	c, err := amqp.DialConfig("amqp://guest:guest@"+os.Args[1]+":"+os.Args[2]+"/", cfg)
	if err != nil {
		fail("dial: %v", err)
	}
	if c.Config.Heartbeat != 2*time.Second {
		fail("negotiated heartbeat %v, wanted 2s", c.Config.Heartbeat)
	}
	closed := c.NotifyClose(make(chan *amqp.Error, 1))
	ch, err := c.Channel()
	if err != nil {
		fail("channel: %v", err)
	}
	q, err := ch.QueueDeclare("", false, false, false, false, amqp.Table{"x-expires": int32(60000)})
	if err != nil {
		fail("declare: %v", err)
	}
	select {
	case e := <-closed:
		fail("connection closed while idle: %v", e)
	case <-time.After(time.Duration(idle * float64(time.Second))):
	}
	if c.IsClosed() {
		fail("connection closed while idle")
	}
	if err := ch.Publish("", q.Name, false, false, amqp.Publishing{Body: []byte("after idle")}); err != nil {
		fail("publish after idle: %v", err)
	}
	var m amqp.Delivery
	ok := false
	for deadline := time.Now().Add(5 * time.Second); !ok && time.Now().Before(deadline); {
		m, ok, err = ch.Get(q.Name, true)
		if err != nil {
			fail("get after idle: %v", err)
		}
		if !ok {
			time.Sleep(50 * time.Millisecond)
		}
	}
	if !ok || string(m.Body) != "after idle" {
		fail("round trip after idle: ok=%v body=%q", ok, m.Body)
	}
	if _, err := ch.QueueDelete(q.Name, false, false, false); err != nil {
		fail("delete: %v", err)
	}
	c.Close()
	fmt.Println("go heartbeat ok")
}
