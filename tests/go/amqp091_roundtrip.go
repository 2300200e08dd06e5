// The Go client (rabbitmq/amqp091-go, from Debian) through the proxy:
// frame_max 4096, confirms, a 200 kB body, Basic.Get, and a 404 that
// closes only the channel. Usage: go run amqp091_roundtrip.go HOST PORT
package main

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"os"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Println("usage: amqp091_roundtrip HOST PORT")
		os.Exit(2)
	}
	cfg := amqp.Config{FrameSize: 4096, Heartbeat: 2 * time.Second}
	c, err := amqp.DialConfig("amqp://guest:guest@"+os.Args[1]+":"+os.Args[2]+"/", cfg)
	if err != nil { fmt.Println("dial", err); os.Exit(1) }
	ch, err := c.Channel()
	if err != nil { fmt.Println("chan", err); os.Exit(1) }
	if err := ch.Confirm(false); err != nil { fmt.Println(err); os.Exit(1) }
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 10))
	q, err := ch.QueueDeclare("", false, true, false, false, nil)
	if err != nil { fmt.Println(err); os.Exit(1) }
	body := make([]byte, 200000); rand.Read(body)
	if err := ch.Publish("", q.Name, false, false, amqp.Publishing{Body: body}); err != nil { fmt.Println(err); os.Exit(1) }
	if cf := <-confirms; !cf.Ack { fmt.Println("nack"); os.Exit(1) }
	m, ok, err := ch.Get(q.Name, true)
	if err != nil || !ok || !bytes.Equal(m.Body, body) { fmt.Println("get", err, ok); os.Exit(1) }
	// passive declare of a missing queue: 404 closes only the channel
	_, err = ch.QueueDeclarePassive("missing-queue-xyz", false, false, false, false, nil)
	if e, ok := err.(*amqp.Error); !ok || e.Code != 404 { fmt.Println("expected 404", err); os.Exit(1) }
	ch2, err := c.Channel()
	if err != nil { fmt.Println("reopen", err); os.Exit(1) }
	ch2.Close()
	c.Close()
	fmt.Println("go ok")
}
