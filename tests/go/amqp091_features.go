// Feature tour of the Go client (rabbitmq/amqp091-go, from Debian) through
// the proxy: prefetch and acks, concurrent consumers, publisher confirms,
// mandatory returns, consumer cancel notifications, transactions,
// exchange-to-exchange and headers routing, large bodies, channel errors,
// direct reply-to, channel/connection churn, exclusive queues, clean
// connection close, and exclusive queues gone when their owner's Close()
// returns. Every step asserts; the first failure exits 1 with
// "FAIL <step>: <reason>". Every connection's bytes are parsed into AMQP
// frames on the side (frame sizes, frame ends, Basic.Deliver and Basic.Ack
// counts), so the checks also cover what went over the wire.
//
// Usage: go run amqp091_features.go HOST PORT [STEP...]
// (all 14 steps by default; prints "ok N <step>" per step, then "go features ok")
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

const (
	waitTimeout = 10 * time.Second // any single expected event
	stepTimeout = 90 * time.Second // a whole step (watchdog)
	queueTTL    = 120000           // x-expires of every queue (ms): leftovers of a crashed run vanish
)

var (
	host, port string
	suffix     string // random, in every queue/exchange name
)

// ------------------------------------------------------------------ wire sniffer

const (
	frameMethod = 1
	frameBody   = 3
)

// direction holds the statistics of one direction of one connection.
type direction struct {
	mu          sync.Mutex
	buf         []byte
	skip        int // bytes of protocol header still to skip (client side)
	frames      int
	maxFrame    int // largest frame, 8 bytes of framing included
	bodyFrames  int
	methods     map[uint32]int // class<<16 | method
	ackMultiple int            // Basic.Ack with multiple=1
	ackSingle   int
	badFrames   []string
}

func newDirection(skip int) *direction {
	return &direction{skip: skip, methods: map[uint32]int{}}
}

func (d *direction) feed(b []byte) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.skip > 0 {
		n := d.skip
		if n > len(b) {
			n = len(b)
		}
		b, d.skip = b[n:], d.skip-n
	}
	d.buf = append(d.buf, b...)
	for len(d.buf) >= 7 {
		size := int(binary.BigEndian.Uint32(d.buf[3:7]))
		total := 7 + size + 1
		if len(d.buf) < total {
			break
		}
		f := d.buf[:total]
		d.frames++
		if total > d.maxFrame {
			d.maxFrame = total
		}
		if f[total-1] != 0xCE && len(d.badFrames) < 5 {
			d.badFrames = append(d.badFrames, fmt.Sprintf("frame %d (type %d, %d bytes) ends in 0x%02x", d.frames, f[0], total, f[total-1]))
		}
		switch f[0] {
		case frameMethod:
			if size >= 4 {
				cm := binary.BigEndian.Uint32(f[7:11])
				d.methods[cm]++
				if cm == 60<<16|80 && size >= 13 { // Basic.Ack: delivery-tag(8) multiple(bit)
					if f[19]&1 == 1 {
						d.ackMultiple++
					} else {
						d.ackSingle++
					}
				}
			}
		case frameBody:
			d.bodyFrames++
		}
		rest := len(d.buf) - total
		copy(d.buf, d.buf[total:])
		d.buf = d.buf[:rest]
	}
}

func (d *direction) method(class, method uint16) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.methods[uint32(class)<<16|uint32(method)]
}

type snapshot struct {
	frames, maxFrame, bodyFrames, ackMultiple, ackSingle int
	bad                                                  []string
}

func (d *direction) snap() snapshot {
	d.mu.Lock()
	defer d.mu.Unlock()
	return snapshot{d.frames, d.maxFrame, d.bodyFrames, d.ackMultiple, d.ackSingle, append([]string(nil), d.badFrames...)}
}

type sniffConn struct {
	net.Conn
	in, out *direction
}

func (s *sniffConn) Read(b []byte) (int, error) {
	n, err := s.Conn.Read(b)
	if n > 0 {
		s.in.feed(b[:n])
	}
	return n, err
}

func (s *sniffConn) Write(b []byte) (int, error) {
	n, err := s.Conn.Write(b)
	if n > 0 {
		s.out.feed(b[:n])
	}
	return n, err
}

// ------------------------------------------------------------------ connections

type conn struct {
	*amqp.Connection
	name   string
	in     *direction // server -> client
	out    *direction // client -> server
	closes chan *amqp.Error
}

func dial(name string, frameSize int) (*conn, error) {
	c := &conn{name: name, in: newDirection(0), out: newDirection(8)}
	cfg := amqp.Config{
		FrameSize:  frameSize,
		Properties: amqp.Table{"connection_name": "go-features-" + suffix + "-" + name},
		Dial: func(network, addr string) (net.Conn, error) {
			nc, err := net.DialTimeout(network, addr, waitTimeout)
			if err != nil {
				return nil, err
			}
			if err := nc.SetDeadline(time.Now().Add(30 * time.Second)); err != nil {
				return nil, err
			}
			return &sniffConn{Conn: nc, in: c.in, out: c.out}, nil
		},
	}
	ac, err := amqp.DialConfig("amqp://guest:guest@"+net.JoinHostPort(host, port)+"/", cfg)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", name, err)
	}
	c.Connection = ac
	c.closes = ac.NotifyClose(make(chan *amqp.Error, 1))
	return c, nil
}

// healthy: the connection is open, was not closed by the server, and every
// frame in both directions was well formed.
func (c *conn) healthy() error {
	select {
	case e, ok := <-c.closes:
		if ok {
			return fmt.Errorf("connection %s was closed: %v", c.name, e)
		}
		return fmt.Errorf("connection %s was closed (no error)", c.name)
	default:
	}
	if c.IsClosed() {
		return fmt.Errorf("connection %s is closed", c.name)
	}
	return c.wireOK()
}

func (c *conn) wireOK() error {
	if bad := c.in.snap().bad; len(bad) > 0 {
		return fmt.Errorf("connection %s: malformed frames from the server: %v", c.name, bad)
	}
	if bad := c.out.snap().bad; len(bad) > 0 {
		return fmt.Errorf("connection %s: malformed frames from the client (sniffer bug?): %v", c.name, bad)
	}
	return nil
}

// shut: the connection is healthy (nothing on NotifyClose so far), Close()
// returns nil and NotifyClose is closed afterwards. Whether NotifyClose
// also carried an error *after* the clean Close is step 13's business (see
// there), so that the other steps test their own feature only.
func (c *conn) shut() error {
	if err := c.healthy(); err != nil {
		return err
	}
	if err := c.Close(); err != nil {
		return fmt.Errorf("connection %s: Close() = %v, want nil", c.name, err)
	}
	deadline := time.After(waitTimeout)
	for {
		select {
		case _, ok := <-c.closes:
			if !ok {
				return c.wireOK()
			}
		case <-deadline:
			return fmt.Errorf("connection %s: NotifyClose channel not closed %v after Close", c.name, waitTimeout)
		}
	}
}

// quietClose is for error paths and deferred cleanup.
func (c *conn) quietClose() {
	if c != nil && c.Connection != nil && !c.IsClosed() {
		_ = c.Close()
	}
}

// ------------------------------------------------------------------ helpers

func name(kind string) string { return "gofeat-" + kind + "-" + suffix }

func qargs(extra amqp.Table) amqp.Table {
	t := amqp.Table{"x-expires": int32(queueTTL)}
	for k, v := range extra {
		t[k] = v
	}
	return t
}

func declare(ch *amqp.Channel, q string, extra amqp.Table) error {
	got, err := ch.QueueDeclare(q, false, false, false, false, qargs(extra))
	if err != nil {
		return fmt.Errorf("declare %s: %w", q, err)
	}
	if got.Name != q {
		return fmt.Errorf("declare %s: DeclareOk names %q", q, got.Name)
	}
	return nil
}

// ready: the queue's ready message count and consumer count (passive declare).
func ready(ch *amqp.Channel, q string) (int, int, error) {
	st, err := ch.QueueDeclarePassive(q, false, false, false, false, nil)
	if err != nil {
		return 0, 0, fmt.Errorf("passive declare %s: %w", q, err)
	}
	return st.Messages, st.Consumers, nil
}

func wantReady(ch *amqp.Channel, q string, want int, why string) error {
	n, _, err := ready(ch, q)
	if err != nil {
		return err
	}
	if n != want {
		return fmt.Errorf("%s: queue has %d ready messages, want %d", why, n, want)
	}
	return nil
}

func recv[T any](c <-chan T, what string) (T, error) {
	select {
	case v, ok := <-c:
		if !ok {
			return v, fmt.Errorf("%s: channel closed", what)
		}
		return v, nil
	case <-time.After(waitTimeout):
		var zero T
		return zero, fmt.Errorf("%s: nothing within %v", what, waitTimeout)
	}
}

// expectClosed: the Go channel is closed (within the timeout) without carrying a value.
func expectClosed[T any](c <-chan T, what string) error {
	select {
	case v, ok := <-c:
		if ok {
			return fmt.Errorf("%s: got %+v, want the channel closed", what, v)
		}
		return nil
	case <-time.After(waitTimeout):
		return fmt.Errorf("%s: not closed within %v", what, waitTimeout)
	}
}

func wantCode(err error, code int, what string) error {
	if err == nil {
		return fmt.Errorf("%s: succeeded, want AMQP error %d", what, code)
	}
	var e *amqp.Error
	if !errors.As(err, &e) {
		return fmt.Errorf("%s: error %T %v, want *amqp.Error %d", what, err, err, code)
	}
	if e.Code != code || !e.Server {
		return fmt.Errorf("%s: got %+v, want code %d from the server", what, *e, code)
	}
	return nil
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return b
}

func confirmChannel(c *conn, nconf int) (*amqp.Channel, chan amqp.Confirmation, error) {
	ch, err := c.Channel()
	if err != nil {
		return nil, nil, fmt.Errorf("open channel on %s: %w", c.name, err)
	}
	if err := ch.Confirm(false); err != nil {
		return nil, nil, fmt.Errorf("confirm.select: %w", err)
	}
	return ch, ch.NotifyPublish(make(chan amqp.Confirmation, nconf)), nil
}

// publishConfirmed publishes and waits for its (positive) confirm.
func publishConfirmed(ch *amqp.Channel, confirms <-chan amqp.Confirmation, exchange, key string, mandatory bool, p amqp.Publishing) error {
	seq := ch.GetNextPublishSeqNo()
	if err := ch.PublishWithContext(context.Background(), exchange, key, mandatory, false, p); err != nil {
		return fmt.Errorf("publish to %q/%q: %w", exchange, key, err)
	}
	cf, err := recv(confirms, fmt.Sprintf("confirm of publish %d to %q/%q", seq, exchange, key))
	if err != nil {
		return err
	}
	if cf.DeliveryTag != seq || !cf.Ack {
		return fmt.Errorf("publish to %q/%q: confirm %+v, want ack of tag %d", exchange, key, cf, seq)
	}
	return nil
}

func getOne(ch *amqp.Channel, q string, what string) (amqp.Delivery, error) {
	d, ok, err := ch.Get(q, true)
	if err != nil {
		return d, fmt.Errorf("%s: get from %s: %w", what, q, err)
	}
	if !ok {
		return d, fmt.Errorf("%s: %s is empty", what, q)
	}
	return d, nil
}

func getEmpty(ch *amqp.Channel, q string, what string) error {
	d, ok, err := ch.Get(q, true)
	if err != nil {
		return fmt.Errorf("%s: get from %s: %w", what, q, err)
	}
	if ok {
		return fmt.Errorf("%s: %s should be empty, got message %q", what, q, d.Body)
	}
	return nil
}

// ------------------------------------------------------------------ 1. qos

func stepQos() error {
	c, err := dial("qos", 0)
	if err != nil {
		return err
	}
	defer c.quietClose()
	pub, confirms, err := confirmChannel(c, 100)
	if err != nil {
		return err
	}
	q := name("qos")
	if err := declare(pub, q, nil); err != nil {
		return err
	}
	const total = 20
	id := func(i int) string { return fmt.Sprintf("m%02d", i) }
	for i := 0; i < total; i++ {
		if err := publishConfirmed(pub, confirms, "", q, false, amqp.Publishing{MessageId: id(i), Body: []byte(id(i))}); err != nil {
			return err
		}
	}
	cons, err := c.Channel()
	if err != nil {
		return err
	}
	if err := cons.Qos(5, 0, false); err != nil {
		return fmt.Errorf("qos: %w", err)
	}
	deliveries, err := cons.Consume(q, "qos-consumer", false, false, false, false, nil)
	if err != nil {
		return fmt.Errorf("consume: %w", err)
	}
	next := func(wantID string, redelivered bool) (amqp.Delivery, error) {
		d, err := recv(deliveries, "delivery of "+wantID)
		if err != nil {
			return d, err
		}
		if d.MessageId != wantID || string(d.Body) != wantID || d.Redelivered != redelivered {
			return d, fmt.Errorf("got delivery %s (body %q, redelivered %v), want %s redelivered=%v",
				d.MessageId, d.Body, d.Redelivered, wantID, redelivered)
		}
		return d, nil
	}
	var held []amqp.Delivery
	for i := 0; i < 5; i++ {
		d, err := next(id(i), false)
		if err != nil {
			return err
		}
		held = append(held, d)
	}
	// 5 unacked: the broker holds the other 15 back
	if err := wantReady(pub, q, 15, "prefetch 5, nothing acked"); err != nil {
		return err
	}
	if n := c.in.method(60, 60); n != 5 {
		return fmt.Errorf("prefetch 5, nothing acked: %d Basic.Deliver frames on the wire, want 5", n)
	}
	// ack multiple: tags 1..5 at once -> exactly 5 more
	if err := cons.Ack(held[4].DeliveryTag, true); err != nil {
		return fmt.Errorf("ack multiple: %w", err)
	}
	held = nil
	for i := 5; i < 10; i++ {
		d, err := next(id(i), false)
		if err != nil {
			return fmt.Errorf("after ack multiple: %w", err)
		}
		held = append(held, d)
	}
	if err := wantReady(pub, q, 10, "after ack multiple of 5"); err != nil {
		return err
	}
	// nack + requeue m05 -> it comes back, redelivered, with a new tag
	if err := cons.Nack(held[0].DeliveryTag, false, true); err != nil {
		return fmt.Errorf("nack: %w", err)
	}
	re, err := next(id(5), true)
	if err != nil {
		return fmt.Errorf("after nack requeue=true: %w", err)
	}
	if re.DeliveryTag <= held[4].DeliveryTag {
		return fmt.Errorf("redelivery tag %d not after %d", re.DeliveryTag, held[4].DeliveryTag)
	}
	// reject m06 without requeue -> gone; the freed slot brings m10
	if err := cons.Reject(held[1].DeliveryTag, false); err != nil {
		return fmt.Errorf("reject: %w", err)
	}
	d10, err := next(id(10), false)
	if err != nil {
		return fmt.Errorf("after reject requeue=false: %w", err)
	}
	if err := wantReady(pub, q, 9, "5 unacked (m05 m07 m08 m09 m10), m06 dropped"); err != nil {
		return err
	}
	if err := cons.Ack(d10.DeliveryTag, true); err != nil {
		return fmt.Errorf("ack multiple #2: %w", err)
	}
	for i := 11; i < total; i++ {
		d, err := next(id(i), false)
		if err != nil {
			return err
		}
		if err := d.Ack(false); err != nil {
			return fmt.Errorf("ack %s: %w", id(i), err)
		}
	}
	if err := cons.Cancel("qos-consumer", false); err != nil {
		return fmt.Errorf("cancel: %w", err)
	}
	if err := expectClosed(deliveries, "deliveries after Basic.Cancel"); err != nil {
		return err
	}
	if err := cons.Close(); err != nil {
		return fmt.Errorf("close consumer channel: %w", err)
	}
	// all acked, consumer gone; m06 (rejected) never came back
	n, consumers, err := ready(pub, q)
	if err != nil {
		return err
	}
	if n != 0 || consumers != 0 {
		return fmt.Errorf("at the end: %d ready, %d consumers, want 0/0", n, consumers)
	}
	if n := c.in.method(60, 60); n != total+1 {
		return fmt.Errorf("%d Basic.Deliver frames on the wire, want %d (20 + 1 redelivery)", n, total+1)
	}
	if _, err := pub.QueueDelete(q, false, false, false); err != nil {
		return err
	}
	return c.shut()
}

// ------------------------------------------------------------------ 2. concurrent consumers

func stepConcurrentConsumers() error {
	const nConns, chPerConn, nPub, perPub = 2, 3, 2, 300
	const total = nPub * perPub
	q := name("multi")
	var conns []*conn
	defer func() {
		for _, c := range conns {
			c.quietClose()
		}
	}()
	for i := 0; i < nConns; i++ {
		c, err := dial(fmt.Sprintf("multi-%d", i), 0)
		if err != nil {
			return err
		}
		conns = append(conns, c)
	}
	admin, err := conns[0].Channel()
	if err != nil {
		return err
	}
	if err := declare(admin, q, nil); err != nil {
		return err
	}
	type event struct {
		consumer    int
		id          string
		redelivered bool
	}
	events := make(chan event, total*2)
	ackErrs := make(chan error, total)
	var wg sync.WaitGroup
	var consumerChans []*amqp.Channel
	nConsumers := nConns * chPerConn
	for i := 0; i < nConsumers; i++ {
		ch, err := conns[i%nConns].Channel()
		if err != nil {
			return err
		}
		if err := ch.Qos(10, 0, false); err != nil {
			return err
		}
		deliveries, err := ch.Consume(q, fmt.Sprintf("c%d", i), false, false, false, false, nil)
		if err != nil {
			return fmt.Errorf("consume %d: %w", i, err)
		}
		consumerChans = append(consumerChans, ch)
		wg.Add(1)
		go func(i int, deliveries <-chan amqp.Delivery) {
			defer wg.Done()
			for d := range deliveries {
				events <- event{i, d.MessageId, d.Redelivered}
				if err := d.Ack(false); err != nil {
					ackErrs <- fmt.Errorf("consumer %d ack %s: %w", i, d.MessageId, err)
				}
			}
		}(i, deliveries)
	}
	if _, consumers, err := ready(admin, q); err != nil || consumers != nConsumers {
		return fmt.Errorf("queue has %d consumers (err %v), want %d", consumers, err, nConsumers)
	}
	pubErrs := make(chan error, nPub)
	for p := 0; p < nPub; p++ {
		go func(p int) {
			pubErrs <- func() error {
				ch, confirms, err := confirmChannel(conns[p%nConns], perPub)
				if err != nil {
					return err
				}
				for i := 0; i < perPub; i++ {
					id := fmt.Sprintf("p%d-%03d", p, i)
					if err := ch.PublishWithContext(context.Background(), "", q, false, false,
						amqp.Publishing{MessageId: id, Body: []byte(id)}); err != nil {
						return fmt.Errorf("publisher %d: %w", p, err)
					}
				}
				for i := 0; i < perPub; i++ {
					cf, err := recv(confirms, fmt.Sprintf("publisher %d confirm %d", p, i+1))
					if err != nil {
						return err
					}
					if !cf.Ack || cf.DeliveryTag != uint64(i+1) {
						return fmt.Errorf("publisher %d: confirm %+v, want ack of %d", p, cf, i+1)
					}
				}
				return ch.Close()
			}()
		}(p)
	}
	seen := map[string]int{}
	perConsumer := make([]int, nConsumers)
	deadline := time.After(30 * time.Second)
	for n := 0; n < total; n++ {
		select {
		case ev := <-events:
			if prev, dup := seen[ev.id]; dup {
				return fmt.Errorf("message %s delivered twice (consumers %d and %d)", ev.id, prev, ev.consumer)
			}
			if ev.redelivered {
				return fmt.Errorf("message %s delivered with redelivered=true", ev.id)
			}
			seen[ev.id] = ev.consumer
			perConsumer[ev.consumer]++
		case err := <-ackErrs:
			return err
		case <-deadline:
			return fmt.Errorf("only %d of %d messages arrived within 30 s", n, total)
		}
	}
	for p := 0; p < nPub; p++ {
		if err := <-pubErrs; err != nil {
			return err
		}
	}
	for p := 0; p < nPub; p++ {
		for i := 0; i < perPub; i++ {
			if _, ok := seen[fmt.Sprintf("p%d-%03d", p, i)]; !ok {
				return fmt.Errorf("message p%d-%03d never arrived", p, i)
			}
		}
	}
	for i, n := range perConsumer {
		if n == 0 {
			return fmt.Errorf("consumer %d got nothing (per consumer: %v)", i, perConsumer)
		}
	}
	for i, ch := range consumerChans {
		if err := ch.Cancel(fmt.Sprintf("c%d", i), false); err != nil {
			return fmt.Errorf("cancel c%d: %w", i, err)
		}
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(waitTimeout):
		return fmt.Errorf("consumer goroutines still running %v after Basic.Cancel", waitTimeout)
	}
	if len(events) != 0 || len(ackErrs) != 0 {
		return fmt.Errorf("%d extra deliveries / %d ack errors after all %d messages", len(events), len(ackErrs), total)
	}
	wire := 0
	for _, c := range conns {
		wire += c.in.method(60, 60)
	}
	if wire != total {
		return fmt.Errorf("%d Basic.Deliver frames on the wire, want %d", wire, total)
	}
	n, consumers, err := ready(admin, q)
	if err != nil {
		return err
	}
	if n != 0 || consumers != 0 {
		return fmt.Errorf("at the end: %d ready, %d consumers, want 0/0", n, consumers)
	}
	fmt.Printf("   per consumer: %v\n", perConsumer)
	if _, err := admin.QueueDelete(q, false, false, false); err != nil {
		return err
	}
	for _, c := range conns {
		if err := c.shut(); err != nil {
			return err
		}
	}
	return nil
}

// ------------------------------------------------------------------ 3. confirms

func stepConfirms() error {
	c, err := dial("confirms", 0)
	if err != nil {
		return err
	}
	defer c.quietClose()
	ch, confirms, err := confirmChannel(c, 2000)
	if err != nil {
		return err
	}
	q := name("confirms")
	if err := declare(ch, q, nil); err != nil {
		return err
	}
	const batch = 1000
	published := 0
	rounds := 0
	// RabbitMQ coalesces the acks of a fast publisher into multiple=true
	// acks; repeat the batch until at least one was on the wire (so the
	// library's resequencing of multiple acks is exercised).
	for rounds < 5 {
		rounds++
		start := ch.GetNextPublishSeqNo()
		if start != uint64(published+1) {
			return fmt.Errorf("next publish seq no %d, want %d", start, published+1)
		}
		for i := 0; i < batch; i++ {
			if seq := ch.GetNextPublishSeqNo(); seq != start+uint64(i) {
				return fmt.Errorf("publish %d: seq no %d, want %d", i, seq, start+uint64(i))
			}
			if err := ch.PublishWithContext(context.Background(), "", q, false, false,
				amqp.Publishing{Body: []byte(fmt.Sprintf("c%d", published+i+1))}); err != nil {
				return err
			}
		}
		for i := 0; i < batch; i++ {
			cf, err := recv(confirms, fmt.Sprintf("confirm %d", start+uint64(i)))
			if err != nil {
				return err
			}
			if cf.DeliveryTag != start+uint64(i) || !cf.Ack {
				return fmt.Errorf("confirm #%d is %+v, want ack of tag %d (in order)", i, cf, start+uint64(i))
			}
		}
		published += batch
		if err := wantReady(ch, q, published, "after all confirms"); err != nil {
			return err
		}
		if c.in.snap().ackMultiple > 0 {
			break
		}
	}
	w := c.in.snap()
	if w.ackMultiple == 0 {
		return fmt.Errorf("no multiple=true Basic.Ack in %d rounds of %d publishes (%d single acks): cannot check the library's handling",
			rounds, batch, w.ackSingle)
	}
	if w.ackMultiple+w.ackSingle > published {
		return fmt.Errorf("%d Basic.Ack frames for %d publishes", w.ackMultiple+w.ackSingle, published)
	}
	fmt.Printf("   %d publishes in %d round(s): %d multiple + %d single Basic.Ack on the wire\n",
		published, rounds, w.ackMultiple, w.ackSingle)

	// deferred confirmations (resolved through the same single/multiple paths)
	const deferred = 500
	var dcs []*amqp.DeferredConfirmation
	for i := 0; i < deferred; i++ {
		dc, err := ch.PublishWithDeferredConfirmWithContext(context.Background(), "", q, false, false, amqp.Publishing{Body: []byte("d")})
		if err != nil {
			return err
		}
		if dc == nil || dc.DeliveryTag != uint64(published+i+1) {
			return fmt.Errorf("deferred confirmation %d: %+v, want tag %d", i, dc, published+i+1)
		}
		dcs = append(dcs, dc)
	}
	waited := make(chan int, 1)
	go func() {
		acked := 0
		for _, dc := range dcs {
			if dc.Wait() {
				acked++
			}
		}
		waited <- acked
	}()
	acked, err := recv(waited, "deferred confirmations")
	if err != nil {
		return err
	}
	if acked != deferred {
		return fmt.Errorf("%d of %d deferred confirmations acked", acked, deferred)
	}
	for i := 0; i < deferred; i++ { // the NotifyPublish listener saw them too
		cf, err := recv(confirms, "listener confirm of deferred publish")
		if err != nil {
			return err
		}
		if cf.DeliveryTag != uint64(published+i+1) || !cf.Ack {
			return fmt.Errorf("listener confirm %+v, want ack of %d", cf, published+i+1)
		}
	}
	published += deferred
	if err := wantReady(ch, q, published, "after the deferred batch"); err != nil {
		return err
	}

	// nacks: a full queue with x-overflow reject-publish nacks the excess
	full := name("confirms-full")
	if err := declare(ch, full, amqp.Table{"x-max-length": int32(10), "x-overflow": "reject-publish"}); err != nil {
		return err
	}
	start := ch.GetNextPublishSeqNo()
	for i := 0; i < 20; i++ {
		if err := ch.PublishWithContext(context.Background(), "", full, false, false, amqp.Publishing{Body: []byte("f")}); err != nil {
			return err
		}
	}
	for i := 0; i < 20; i++ {
		cf, err := recv(confirms, "confirm on the full queue")
		if err != nil {
			return err
		}
		if cf.DeliveryTag != start+uint64(i) || cf.Ack != (i < 10) {
			return fmt.Errorf("full queue: confirm #%d is %+v, want tag %d ack=%v", i, cf, start+uint64(i), i < 10)
		}
	}
	if err := wantReady(ch, full, 10, "x-max-length 10"); err != nil {
		return err
	}
	for _, qq := range []string{q, full} {
		if _, err := ch.QueueDelete(qq, false, false, false); err != nil {
			return err
		}
	}
	if err := ch.Close(); err != nil {
		return err
	}
	if err := expectClosed(confirms, "NotifyPublish after Channel.Close"); err != nil {
		return err
	}
	return c.shut()
}

// ------------------------------------------------------------------ 4. mandatory

func stepMandatory() error {
	c, err := dial("mandatory", 0)
	if err != nil {
		return err
	}
	defer c.quietClose()
	ch, confirms, err := confirmChannel(c, 10)
	if err != nil {
		return err
	}
	returns := ch.NotifyReturn(make(chan amqp.Return, 10))
	q := name("mandatory")
	if err := declare(ch, q, nil); err != nil {
		return err
	}
	check := func(exchange, key string) error {
		body := randBytes(1000)
		p := amqp.Publishing{MessageId: "ret-" + key, CorrelationId: "corr", Headers: amqp.Table{"h": "v"}, Body: body}
		if err := publishConfirmed(ch, confirms, exchange, key, true, p); err != nil {
			return err
		}
		// the broker sends Basic.Return before the ack, so it is already there
		select {
		case r := <-returns:
			if r.ReplyCode != 312 || r.ReplyText != "NO_ROUTE" || r.Exchange != exchange || r.RoutingKey != key ||
				r.MessageId != p.MessageId || r.CorrelationId != "corr" || r.Headers["h"] != "v" || !bytes.Equal(r.Body, body) {
				return fmt.Errorf("return for %q/%q: code %d %q exchange %q key %q id %q headers %v, body equal %v",
					exchange, key, r.ReplyCode, r.ReplyText, r.Exchange, r.RoutingKey, r.MessageId, r.Headers, bytes.Equal(r.Body, body))
			}
		default:
			return fmt.Errorf("mandatory publish to %q/%q: acked but no Basic.Return", exchange, key)
		}
		return nil
	}
	if err := check("amq.direct", name("nokey")); err != nil {
		return err
	}
	if err := check("", name("noqueue")); err != nil {
		return err
	}
	// routable mandatory and unroutable non-mandatory: no return
	if err := publishConfirmed(ch, confirms, "", q, true, amqp.Publishing{Body: []byte("routed")}); err != nil {
		return err
	}
	if err := publishConfirmed(ch, confirms, "amq.direct", name("nokey"), false, amqp.Publishing{Body: []byte("dropped")}); err != nil {
		return err
	}
	select {
	case r := <-returns:
		return fmt.Errorf("unexpected Basic.Return %d %q for %q", r.ReplyCode, r.ReplyText, r.RoutingKey)
	default:
	}
	d, err := getOne(ch, q, "routed mandatory publish")
	if err != nil {
		return err
	}
	if string(d.Body) != "routed" {
		return fmt.Errorf("got %q, want \"routed\"", d.Body)
	}
	if n := c.in.method(60, 50); n != 2 {
		return fmt.Errorf("%d Basic.Return frames on the wire, want 2", n)
	}
	if _, err := ch.QueueDelete(q, false, false, false); err != nil {
		return err
	}
	if err := ch.Close(); err != nil {
		return err
	}
	if err := expectClosed(returns, "NotifyReturn after Channel.Close"); err != nil {
		return err
	}
	return c.shut()
}

// ------------------------------------------------------------------ 5. consumer cancel notify

func stepCancelNotify() error {
	c, err := dial("cancel", 0)
	if err != nil {
		return err
	}
	defer c.quietClose()
	caps, _ := c.Properties["capabilities"].(amqp.Table)
	if caps["consumer_cancel_notify"] != true {
		return fmt.Errorf("server capabilities %v lack consumer_cancel_notify=true", caps)
	}
	other, err := dial("cancel-deleter", 0)
	if err != nil {
		return err
	}
	defer other.quietClose()
	ch, err := c.Channel()
	if err != nil {
		return err
	}
	cancels := ch.NotifyCancel(make(chan string, 4))
	closes := ch.NotifyClose(make(chan *amqp.Error, 1))
	q := name("cancel")
	if err := declare(ch, q, nil); err != nil {
		return err
	}
	tag := "cancel-me-" + suffix
	deliveries, err := ch.Consume(q, tag, true, false, false, false, nil)
	if err != nil {
		return err
	}
	// the consumer is live: a message reaches it
	if err := ch.PublishWithContext(context.Background(), "", q, false, false, amqp.Publishing{Body: []byte("before")}); err != nil {
		return err
	}
	if d, err := recv(deliveries, "delivery before the delete"); err != nil {
		return err
	} else if string(d.Body) != "before" || d.ConsumerTag != tag {
		return fmt.Errorf("delivery %q tag %q", d.Body, d.ConsumerTag)
	}
	och, err := other.Channel()
	if err != nil {
		return err
	}
	if _, err := och.QueueDelete(q, false, false, false); err != nil {
		return fmt.Errorf("delete the queue under the consumer: %w", err)
	}
	got, err := recv(cancels, "NotifyCancel after the queue was deleted")
	if err != nil {
		return err
	}
	if got != tag {
		return fmt.Errorf("NotifyCancel gave %q, want %q", got, tag)
	}
	if err := expectClosed(deliveries, "deliveries after the server's Basic.Cancel"); err != nil {
		return err
	}
	if n := c.in.method(60, 30); n != 1 {
		return fmt.Errorf("%d server Basic.Cancel frames on the wire, want 1", n)
	}
	// the channel survives
	if ch.IsClosed() {
		return fmt.Errorf("the channel closed after the cancel notification")
	}
	q2 := name("cancel2")
	if err := declare(ch, q2, nil); err != nil {
		return fmt.Errorf("channel after cancel: %w", err)
	}
	if _, err := ch.QueueDelete(q2, false, false, false); err != nil {
		return err
	}
	select {
	case e := <-closes:
		return fmt.Errorf("channel NotifyClose: %v", e)
	default:
	}
	if err := other.shut(); err != nil {
		return err
	}
	return c.shut()
}

// ------------------------------------------------------------------ 6. tx

func stepTx() error {
	c, err := dial("tx", 0)
	if err != nil {
		return err
	}
	defer c.quietClose()
	tx, err := c.Channel()
	if err != nil {
		return err
	}
	q := name("tx")
	if err := declare(tx, q, nil); err != nil {
		return err
	}
	if err := tx.Tx(); err != nil {
		return fmt.Errorf("tx.select: %w", err)
	}
	// Counts are read on the tx channel itself: its publishes reach the
	// queue before its later passive declare does.
	pub := func(body string) error {
		return tx.PublishWithContext(context.Background(), "", q, false, false, amqp.Publishing{Body: []byte(body)})
	}
	for i := 0; i < 3; i++ {
		if err := pub(fmt.Sprintf("rolled-back-%d", i)); err != nil {
			return err
		}
	}
	if err := tx.TxRollback(); err != nil {
		return fmt.Errorf("tx.rollback: %w", err)
	}
	if err := wantReady(tx, q, 0, "after publish + rollback"); err != nil {
		return err
	}
	if err := getEmpty(tx, q, "after rollback"); err != nil {
		return err
	}
	for _, b := range []string{"committed-1", "committed-2"} {
		if err := pub(b); err != nil {
			return err
		}
	}
	if err := wantReady(tx, q, 0, "published, not yet committed"); err != nil {
		return err
	}
	if err := tx.TxCommit(); err != nil {
		return fmt.Errorf("tx.commit: %w", err)
	}
	if err := wantReady(tx, q, 2, "after commit"); err != nil {
		return err
	}
	// acks are transactional too: a rolled-back ack leaves the delivery
	// unacked, so its tag can be acked again (acking an already acked tag
	// is a 406 PRECONDITION_FAILED "unknown delivery tag")
	d, ok, err := tx.Get(q, false)
	if err != nil || !ok || string(d.Body) != "committed-1" {
		return fmt.Errorf("get in tx: %q ok=%v err=%v", d.Body, ok, err)
	}
	if err := tx.Ack(d.DeliveryTag, false); err != nil {
		return err
	}
	if err := tx.TxRollback(); err != nil {
		return err
	}
	if err := tx.Ack(d.DeliveryTag, false); err != nil {
		return err
	}
	if err := tx.TxCommit(); err != nil {
		return fmt.Errorf("commit of the re-ack after a rolled-back ack: %w", err)
	}
	if err := wantReady(tx, q, 1, "after committing the ack"); err != nil {
		return err
	}
	// and a committed ack is final: the same tag again is unknown
	closes := tx.NotifyClose(make(chan *amqp.Error, 1))
	if err := tx.Ack(d.DeliveryTag, false); err != nil {
		return err
	}
	err = tx.TxCommit()
	if err := wantCode(err, 406, "commit of a second ack of the same tag"); err != nil {
		return err
	}
	if e, err := recv(closes, "NotifyClose after the 406"); err != nil {
		return err
	} else if !strings.Contains(e.Reason, "unknown delivery tag") {
		return fmt.Errorf("406 reason %q, want unknown delivery tag", e.Reason)
	}
	obs, err := c.Channel()
	if err != nil {
		return err
	}
	if m, err := getOne(obs, q, "the other committed message"); err != nil {
		return err
	} else if string(m.Body) != "committed-2" || m.Redelivered {
		return fmt.Errorf("got %q (redelivered %v), want committed-2", m.Body, m.Redelivered)
	}
	if _, err := obs.QueueDelete(q, false, false, false); err != nil {
		return err
	}
	return c.shut()
}

// ------------------------------------------------------------------ 7. e2e + headers

func stepRouting() error {
	c, err := dial("routing", 0)
	if err != nil {
		return err
	}
	defer c.quietClose()
	ch, confirms, err := confirmChannel(c, 20)
	if err != nil {
		return err
	}
	returns := ch.NotifyReturn(make(chan amqp.Return, 20))
	// not auto-delete (src would vanish with its last binding at the unbind
	// below): deleted at the end, or here on failure
	src, dst, hx := name("src"), name("dst"), name("headers")
	defer func() {
		if !c.IsClosed() {
			if cc, err := c.Channel(); err == nil {
				for _, x := range []string{src, dst, hx} {
					_ = cc.ExchangeDelete(x, false, false)
				}
			}
		}
	}()
	if err := ch.ExchangeDeclare(src, "topic", false, false, false, false, nil); err != nil {
		return err
	}
	if err := ch.ExchangeDeclare(dst, "fanout", false, false, false, false, nil); err != nil {
		return err
	}
	if err := ch.ExchangeBind(dst, "a.*", src, false, nil); err != nil {
		return fmt.Errorf("exchange.bind: %w", err)
	}
	qe := name("e2e")
	if err := declare(ch, qe, nil); err != nil {
		return err
	}
	if err := ch.QueueBind(qe, "", dst, false, nil); err != nil {
		return err
	}
	// publish mandatory and report whether it was returned (return precedes the ack)
	route := func(exchange, key string, headers amqp.Table, body string) (bool, error) {
		if err := publishConfirmed(ch, confirms, exchange, key, true, amqp.Publishing{Headers: headers, Body: []byte(body)}); err != nil {
			return false, err
		}
		select {
		case r := <-returns:
			if r.ReplyCode != 312 || string(r.Body) != body {
				return true, fmt.Errorf("return %d %q body %q", r.ReplyCode, r.ReplyText, r.Body)
			}
			return true, nil
		default:
			return false, nil
		}
	}
	drain := func(q string) ([]string, error) {
		var got []string
		for {
			d, ok, err := ch.Get(q, true)
			if err != nil {
				return nil, err
			}
			if !ok {
				return got, nil
			}
			got = append(got, string(d.Body))
		}
	}
	expect := func(q string, want ...string) error {
		got, err := drain(q)
		if err != nil {
			return err
		}
		if strings.Join(got, ",") != strings.Join(want, ",") {
			return fmt.Errorf("queue %s holds %v, want %v", q, got, want)
		}
		return nil
	}
	if ret, err := route(src, "a.b", nil, "via-e2e"); err != nil || ret {
		return fmt.Errorf("publish %s/a.b: returned=%v err=%v, want routed through %s", src, ret, err, dst)
	}
	if ret, err := route(src, "b.c", nil, "no-match"); err != nil || !ret {
		return fmt.Errorf("publish %s/b.c: returned=%v err=%v, want 312 NO_ROUTE", src, ret, err)
	}
	if err := expect(qe, "via-e2e"); err != nil {
		return err
	}
	if err := ch.ExchangeUnbind(dst, "a.*", src, false, nil); err != nil {
		return fmt.Errorf("exchange.unbind: %w", err)
	}
	if ret, err := route(src, "a.b", nil, "after-unbind"); err != nil || !ret {
		return fmt.Errorf("publish %s/a.b after unbind: returned=%v err=%v, want 312", src, ret, err)
	}
	if err := expect(qe); err != nil {
		return err
	}

	// headers exchange
	if err := ch.ExchangeDeclare(hx, "headers", false, false, false, false, nil); err != nil {
		return err
	}
	qAll, qAny := name("hall"), name("hany")
	for q, match := range map[string]string{qAll: "all", qAny: "any"} {
		if err := declare(ch, q, nil); err != nil {
			return err
		}
		if err := ch.QueueBind(q, "", hx, false, amqp.Table{"x-match": match, "color": "red", "size": "big"}); err != nil {
			return fmt.Errorf("bind %s x-match=%s: %w", q, match, err)
		}
	}
	cases := []struct {
		headers  amqp.Table
		body     string
		returned bool
	}{
		{amqp.Table{"color": "red", "size": "big"}, "both", false},
		{amqp.Table{"color": "red", "size": "big", "extra": int32(1)}, "both-extra", false},
		{amqp.Table{"color": "red"}, "color-only", false},
		{amqp.Table{"color": "blue", "size": "big"}, "size-only", false},
		{amqp.Table{"size": "small"}, "none", true},
		{nil, "no-headers", true},
	}
	for _, tc := range cases {
		ret, err := route(hx, "ignored", tc.headers, tc.body)
		if err != nil {
			return err
		}
		if ret != tc.returned {
			return fmt.Errorf("headers %v: returned=%v, want %v", tc.headers, ret, tc.returned)
		}
	}
	if err := expect(qAll, "both", "both-extra"); err != nil {
		return fmt.Errorf("x-match all: %w", err)
	}
	if err := expect(qAny, "both", "both-extra", "color-only", "size-only"); err != nil {
		return fmt.Errorf("x-match any: %w", err)
	}
	for _, q := range []string{qe, qAll, qAny} {
		if _, err := ch.QueueDelete(q, false, false, false); err != nil {
			return err
		}
	}
	for _, x := range []string{src, dst, hx} {
		if err := ch.ExchangeDelete(x, false, false); err != nil {
			return fmt.Errorf("delete exchange %s: %w", x, err)
		}
	}
	for _, x := range []string{src, dst, hx} {
		cc, err := c.Channel()
		if err != nil {
			return err
		}
		if err := wantCode(cc.ExchangeDeclarePassive(x, "topic", false, false, false, false, nil), 404, "passive declare of deleted "+x); err != nil {
			return err
		}
	}
	return c.shut()
}

// ------------------------------------------------------------------ 8. large bodies

func stepLargeBodies() error {
	for _, fs := range []int{0, 4096} {
		if err := largeBodies(fs); err != nil {
			return fmt.Errorf("frame size %d: %w", fs, err)
		}
	}
	return nil
}

func largeBodies(frameSize int) error {
	c, err := dial(fmt.Sprintf("large-%d", frameSize), frameSize)
	if err != nil {
		return err
	}
	defer c.quietClose()
	negotiated := c.Config.FrameSize
	if frameSize != 0 && negotiated != frameSize {
		return fmt.Errorf("negotiated frame_max %d, asked for %d", negotiated, frameSize)
	}
	if frameSize == 0 && negotiated <= 4096 {
		return fmt.Errorf("default frame_max is %d", negotiated)
	}
	ch, confirms, err := confirmChannel(c, 10)
	if err != nil {
		return err
	}
	q := name(fmt.Sprintf("large-%d", frameSize))
	if err := declare(ch, q, nil); err != nil {
		return err
	}
	bodies := [][]byte{randBytes(1 << 20), randBytes(5 << 20)}
	for _, b := range bodies {
		if err := publishConfirmed(ch, confirms, "", q, false, amqp.Publishing{Body: b}); err != nil {
			return err
		}
	}
	for i, b := range bodies {
		d, err := getOne(ch, q, "large get")
		if err != nil {
			return err
		}
		if !bytes.Equal(d.Body, b) {
			return fmt.Errorf("Basic.Get of body %d: %d bytes, not byte-identical to the %d published", i, len(d.Body), len(b))
		}
	}
	for _, b := range bodies {
		if err := publishConfirmed(ch, confirms, "", q, false, amqp.Publishing{Body: b}); err != nil {
			return err
		}
	}
	deliveries, err := ch.Consume(q, "large", false, false, false, false, nil)
	if err != nil {
		return err
	}
	for i, b := range bodies {
		d, err := recv(deliveries, "large delivery")
		if err != nil {
			return err
		}
		if !bytes.Equal(d.Body, b) {
			return fmt.Errorf("Basic.Deliver of body %d: %d bytes, not byte-identical to the %d published", i, len(d.Body), len(b))
		}
		if err := d.Ack(false); err != nil {
			return err
		}
	}
	if err := ch.Cancel("large", false); err != nil {
		return err
	}
	if err := wantReady(ch, q, 0, "after consuming"); err != nil {
		return err
	}
	in, out := c.in.snap(), c.out.snap()
	if in.maxFrame > negotiated || out.maxFrame > negotiated {
		return fmt.Errorf("frames larger than frame_max %d: %d from the server, %d from the client", negotiated, in.maxFrame, out.maxFrame)
	}
	if in.maxFrame != negotiated {
		return fmt.Errorf("largest frame from the server is %d bytes: 12 MiB of bodies should fill frames of frame_max %d", in.maxFrame, negotiated)
	}
	minBodyFrames := 2 * ((6 << 20) / (negotiated - 8))
	if in.bodyFrames < minBodyFrames {
		return fmt.Errorf("%d body frames from the server, want >= %d", in.bodyFrames, minBodyFrames)
	}
	fmt.Printf("   frame_max %d: %d body frames in (largest frame %d), %d out (largest %d)\n",
		negotiated, in.bodyFrames, in.maxFrame, out.bodyFrames, out.maxFrame)
	if _, err := ch.QueueDelete(q, false, false, false); err != nil {
		return err
	}
	return c.shut()
}

// ------------------------------------------------------------------ 9. channel errors

func stepChannelErrors() error {
	c, err := dial("errors", 0)
	if err != nil {
		return err
	}
	defer c.quietClose()
	bad, err := c.Channel()
	if err != nil {
		return err
	}
	badCloses := bad.NotifyClose(make(chan *amqp.Error, 1))
	good, err := c.Channel()
	if err != nil {
		return err
	}
	goodCloses := good.NotifyClose(make(chan *amqp.Error, 1))
	q := name("errors")
	if err := declare(good, q, nil); err != nil {
		return err
	}
	roundTrip := func(ch *amqp.Channel, body string) error {
		if err := ch.PublishWithContext(context.Background(), "", q, false, false, amqp.Publishing{Body: []byte(body)}); err != nil {
			return err
		}
		d, err := getOne(ch, q, "round trip "+body)
		if err != nil {
			return err
		}
		if string(d.Body) != body {
			return fmt.Errorf("round trip: got %q, want %q", d.Body, body)
		}
		return nil
	}
	if err := roundTrip(bad, "before-404"); err != nil {
		return err
	}
	_, err = bad.QueueDeclarePassive(name("missing"), false, false, false, false, nil)
	if err := wantCode(err, 404, "passive declare of a missing queue"); err != nil {
		return err
	}
	if e, err := recv(badCloses, "NotifyClose of the failed channel"); err != nil {
		return err
	} else if e.Code != 404 || !strings.HasPrefix(e.Reason, "NOT_FOUND") {
		return fmt.Errorf("channel closed with %+v, want 404 NOT_FOUND", *e)
	}
	if !bad.IsClosed() {
		return fmt.Errorf("channel not closed after 404")
	}
	if err := bad.PublishWithContext(context.Background(), "", q, false, false, amqp.Publishing{}); err != amqp.ErrClosed {
		return fmt.Errorf("publish on the closed channel: %v, want ErrClosed", err)
	}
	if err := c.healthy(); err != nil {
		return fmt.Errorf("after the 404: %w", err)
	}
	if err := roundTrip(good, "other-channel-after-404"); err != nil {
		return fmt.Errorf("other channel after the 404: %w", err)
	}
	reopened, err := c.Channel()
	if err != nil {
		return fmt.Errorf("re-open a channel after the 404: %w", err)
	}
	if err := roundTrip(reopened, "reopened"); err != nil {
		return err
	}

	// 406: same queue, different arguments
	q406 := name("ttl")
	if err := declare(reopened, q406, amqp.Table{"x-message-ttl": int32(60000)}); err != nil {
		return err
	}
	reCloses := reopened.NotifyClose(make(chan *amqp.Error, 1))
	_, err = reopened.QueueDeclare(q406, false, false, false, false, qargs(amqp.Table{"x-message-ttl": int32(1000)}))
	if err := wantCode(err, 406, "redeclare with a different x-message-ttl"); err != nil {
		return err
	}
	if e, err := recv(reCloses, "NotifyClose after the 406"); err != nil {
		return err
	} else if e.Code != 406 || !strings.HasPrefix(e.Reason, "PRECONDITION_FAILED") {
		return fmt.Errorf("channel closed with %+v, want 406 PRECONDITION_FAILED", *e)
	}
	if err := c.healthy(); err != nil {
		return fmt.Errorf("after the 406: %w", err)
	}
	if err := roundTrip(good, "other-channel-after-406"); err != nil {
		return fmt.Errorf("other channel after the 406: %w", err)
	}
	third, err := c.Channel()
	if err != nil {
		return err
	}
	if _, consumers, err := ready(third, q406); err != nil || consumers != 0 {
		return fmt.Errorf("the 406 queue after the error: %v", err)
	}
	if err := roundTrip(third, "third"); err != nil {
		return err
	}
	select {
	case e := <-goodCloses:
		return fmt.Errorf("the healthy channel got NotifyClose %v", e)
	default:
	}
	for _, qq := range []string{q, q406} {
		if _, err := third.QueueDelete(qq, false, false, false); err != nil {
			return err
		}
	}
	return c.shut()
}

// ------------------------------------------------------------------ 10. direct reply-to

func stepDirectReplyTo() error {
	client, err := dial("rpc-client", 0)
	if err != nil {
		return err
	}
	defer client.quietClose()
	server, err := dial("rpc-server", 0)
	if err != nil {
		return err
	}
	defer server.quietClose()
	rpcQ := name("rpc")
	sch, err := server.Channel()
	if err != nil {
		return err
	}
	if err := declare(sch, rpcQ, nil); err != nil {
		return err
	}
	requests, err := sch.Consume(rpcQ, "rpc-server", false, false, false, false, nil)
	if err != nil {
		return err
	}
	serverErr := make(chan error, 1)
	go func() {
		for d := range requests {
			if !strings.HasPrefix(d.ReplyTo, "amq.rabbitmq.reply-to.") {
				serverErr <- fmt.Errorf("request reply_to is %q, want the broker's amq.rabbitmq.reply-to.* name", d.ReplyTo)
				return
			}
			err := sch.PublishWithContext(context.Background(), "", d.ReplyTo, false, false, amqp.Publishing{
				CorrelationId: d.CorrelationId, Body: append([]byte("reply to "), d.Body...)})
			if err == nil {
				err = d.Ack(false)
			}
			if err != nil {
				serverErr <- err
				return
			}
		}
	}()
	cch, err := client.Channel()
	if err != nil {
		return err
	}
	replies, err := cch.Consume("amq.rabbitmq.reply-to", "", true, false, false, false, nil)
	if err != nil {
		return fmt.Errorf("consume amq.rabbitmq.reply-to: %w", err)
	}
	const n = 20
	for i := 0; i < n; i++ {
		corr := fmt.Sprintf("corr-%d", i)
		if err := cch.PublishWithContext(context.Background(), "", rpcQ, false, false, amqp.Publishing{
			ReplyTo: "amq.rabbitmq.reply-to", CorrelationId: corr, Body: []byte(corr)}); err != nil {
			return err
		}
		select {
		case r, ok := <-replies:
			if !ok {
				return fmt.Errorf("reply consumer closed")
			}
			if r.CorrelationId != corr || string(r.Body) != "reply to "+corr {
				return fmt.Errorf("reply %d: correlation %q body %q", i, r.CorrelationId, r.Body)
			}
		case err := <-serverErr:
			return fmt.Errorf("responder: %w", err)
		case <-time.After(waitTimeout):
			return fmt.Errorf("no reply to request %d within %v", i, waitTimeout)
		}
	}
	if _, err := sch.QueueDelete(rpcQ, false, false, false); err != nil {
		return err
	}
	select {
	case err := <-serverErr:
		return fmt.Errorf("responder: %w", err)
	default:
	}
	if err := server.shut(); err != nil {
		return err
	}
	return client.shut()
}

// ------------------------------------------------------------------ 11. churn

func stepChurn() error {
	c, err := dial("churn", 0)
	if err != nil {
		return err
	}
	defer c.quietClose()
	admin, err := c.Channel()
	if err != nil {
		return err
	}
	q := name("churn")
	if err := declare(admin, q, nil); err != nil {
		return err
	}
	for i := 0; i < 100; i++ {
		ch, err := c.Channel()
		if err != nil {
			return fmt.Errorf("channel %d: %w", i, err)
		}
		body := fmt.Sprintf("channel-%d", i)
		if err := ch.PublishWithContext(context.Background(), "", q, false, false, amqp.Publishing{Body: []byte(body)}); err != nil {
			return fmt.Errorf("channel %d: %w", i, err)
		}
		d, err := getOne(ch, q, body)
		if err != nil {
			return err
		}
		if string(d.Body) != body {
			return fmt.Errorf("channel %d: got %q, want %q", i, d.Body, body)
		}
		if err := ch.Close(); err != nil {
			return fmt.Errorf("close channel %d: %w", i, err)
		}
	}
	if n := c.out.method(20, 10); n != 101 {
		return fmt.Errorf("%d Channel.Open sent, want 101", n)
	}
	if n := c.in.method(20, 41); n != 100 {
		return fmt.Errorf("%d Channel.CloseOk received, want 100", n)
	}
	for i := 0; i < 20; i++ {
		cc, err := dial(fmt.Sprintf("churn-conn-%d", i), 0)
		if err != nil {
			return err
		}
		ch, err := cc.Channel()
		if err != nil {
			cc.quietClose()
			return fmt.Errorf("connection %d: %w", i, err)
		}
		body := fmt.Sprintf("connection-%d", i)
		if err := ch.PublishWithContext(context.Background(), "", q, false, false, amqp.Publishing{Body: []byte(body)}); err != nil {
			cc.quietClose()
			return err
		}
		d, err := getOne(ch, q, body)
		if err != nil {
			cc.quietClose()
			return err
		}
		if string(d.Body) != body {
			cc.quietClose()
			return fmt.Errorf("connection %d: got %q, want %q", i, d.Body, body)
		}
		if err := cc.shut(); err != nil {
			return err
		}
	}
	if err := wantReady(admin, q, 0, "after churn"); err != nil {
		return err
	}
	if _, err := admin.QueueDelete(q, false, false, false); err != nil {
		return err
	}
	return c.shut()
}

// ------------------------------------------------------------------ 12. exclusive

func stepExclusive() error {
	a, err := dial("excl-owner", 0)
	if err != nil {
		return err
	}
	defer a.quietClose()
	b, err := dial("excl-other", 0)
	if err != nil {
		return err
	}
	defer b.quietClose()
	ach, err := a.Channel()
	if err != nil {
		return err
	}
	q := name("exclusive")
	if _, err := ach.QueueDeclare(q, false, false, true, false, qargs(nil)); err != nil {
		return fmt.Errorf("declare exclusive: %w", err)
	}
	if err := ach.PublishWithContext(context.Background(), "", q, false, false, amqp.Publishing{Body: []byte("mine")}); err != nil {
		return err
	}
	if d, err := getOne(ach, q, "owner's get"); err != nil {
		return err
	} else if string(d.Body) != "mine" {
		return fmt.Errorf("owner got %q", d.Body)
	}
	attempt := func(what string, code int, f func(ch *amqp.Channel) error) error {
		ch, err := b.Channel()
		if err != nil {
			return err
		}
		if err := wantCode(f(ch), code, what); err != nil {
			return err
		}
		if !ch.IsClosed() {
			return fmt.Errorf("%s: channel still open after %d", what, code)
		}
		return b.healthy()
	}
	if err := attempt("other connection's passive declare", 405, func(ch *amqp.Channel) error {
		_, err := ch.QueueDeclarePassive(q, false, false, false, false, nil)
		return err
	}); err != nil {
		return err
	}
	if err := attempt("other connection's consume", 405, func(ch *amqp.Channel) error {
		_, err := ch.Consume(q, "", true, false, false, false, nil)
		return err
	}); err != nil {
		return err
	}
	if err := attempt("other connection's basic.get", 405, func(ch *amqp.Channel) error {
		_, _, err := ch.Get(q, true)
		return err
	}); err != nil {
		return err
	}
	if err := attempt("other connection's delete", 405, func(ch *amqp.Channel) error {
		_, err := ch.QueueDelete(q, false, false, false)
		return err
	}); err != nil {
		return err
	}
	// publishing to it stays allowed for others (as on RabbitMQ)
	bpub, bconfirms, err := confirmChannel(b, 1)
	if err != nil {
		return err
	}
	if err := publishConfirmed(bpub, bconfirms, "", q, false, amqp.Publishing{Body: []byte("from the other connection")}); err != nil {
		return fmt.Errorf("other connection's publish to the exclusive queue: %w", err)
	}
	// still the owner's, still working
	if err := wantReady(ach, q, 1, "owner's passive declare"); err != nil {
		return err
	}
	if d, err := getOne(ach, q, "owner's get of the other's message"); err != nil {
		return err
	} else if string(d.Body) != "from the other connection" {
		return fmt.Errorf("owner got %q", d.Body)
	}
	if err := a.shut(); err != nil {
		return err
	}
	// The queue goes with its owner. Here: eventually (poll; each probe
	// needs a fresh channel, a 404 closes it). Step 14 checks that it is
	// gone as soon as the owner's Close() returned, as on RabbitMQ.
	start := time.Now()
	outcomes := map[string]int{}
	for {
		ch, err := b.Channel()
		if err != nil {
			return err
		}
		out := probeExclusive(ch, q)
		outcomes[out]++
		if out == "404" {
			break
		}
		if out != "405" && out != "visible" {
			return fmt.Errorf("probe after the owner closed: %s", out)
		}
		if time.Since(start) > 5*time.Second {
			return fmt.Errorf("exclusive queue still there %v after its owner closed (probes: %v)", time.Since(start), outcomes)
		}
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Printf("   gone (404) %v after the owner's Close returned, probes %v\n", time.Since(start).Round(time.Millisecond), outcomes)
	return b.shut()
}

// probeExclusive: "404" (gone), "405" (still locked), "visible" (the
// passive declare succeeded: another connection sees the queue) or an error text.
func probeExclusive(ch *amqp.Channel, q string) string {
	_, err := ch.QueueDeclarePassive(q, false, false, false, false, nil)
	if err == nil {
		return "visible"
	}
	var e *amqp.Error
	if errors.As(err, &e) && e.Server && (e.Code == 404 || e.Code == 405) {
		return fmt.Sprint(e.Code)
	}
	return fmt.Sprintf("unexpected error %v", err)
}

// ------------------------------------------------------------------ 13. clean close

// closeOnce: a fresh connection with a channel (and a consumer on q when
// given) is closed by the client. Returns what NotifyClose (connection
// and channel) reported after the clean Close, separately from any other
// failure.
func closeOnce(i int, q string) (reported string, err error) {
	c, err := dial(fmt.Sprintf("close-%d", i), 0)
	if err != nil {
		return "", err
	}
	defer c.quietClose()
	ch, err := c.Channel()
	if err != nil {
		return "", err
	}
	chCloses := ch.NotifyClose(make(chan *amqp.Error, 1))
	blocks := c.NotifyBlocked(make(chan amqp.Blocking, 1))
	if q != "" {
		if _, err := ch.Consume(q, "", true, false, false, false, nil); err != nil {
			return "", err
		}
	} else if err := ch.PublishWithContext(context.Background(), "amq.direct", name("nowhere"), false, false, amqp.Publishing{}); err != nil {
		return "", err
	}
	if err := c.healthy(); err != nil {
		return "", err
	}
	if err := c.Close(); err != nil {
		return "", fmt.Errorf("Close() = %v, want nil", err)
	}
	if !c.IsClosed() || !ch.IsClosed() {
		return "", fmt.Errorf("IsClosed after Close: connection %v channel %v", c.IsClosed(), ch.IsClosed())
	}
	if err := c.Close(); err != amqp.ErrClosed {
		return "", fmt.Errorf("second Close() = %v, want ErrClosed", err)
	}
	if _, err := c.Channel(); err == nil {
		return "", fmt.Errorf("Channel() on a closed connection succeeded")
	}
	if err := expectClosed(blocks, "NotifyBlocked after Close"); err != nil {
		return "", err
	}
	for _, x := range []struct {
		what string
		c    chan *amqp.Error
	}{{"connection", c.closes}, {"channel", chCloses}} {
		select {
		case e, ok := <-x.c:
			if ok {
				reported += fmt.Sprintf("%s NotifyClose: %v; ", x.what, e)
				if err := expectClosed(x.c, x.what+" NotifyClose after its error"); err != nil {
					return "", err
				}
			}
		case <-time.After(waitTimeout):
			return "", fmt.Errorf("%s NotifyClose not closed %v after Close", x.what, waitTimeout)
		}
	}
	if n := c.out.method(10, 50); n != 1 {
		return "", fmt.Errorf("%d Connection.Close sent, want 1", n)
	}
	if n := c.in.method(10, 51); n != 1 {
		return "", fmt.Errorf("%d Connection.CloseOk received, want 1", n)
	}
	if n := c.in.method(10, 50); n != 0 {
		return "", fmt.Errorf("the server sent Connection.Close %d time(s)", n)
	}
	return reported, c.wireOK()
}

func stepCleanClose() error {
	admin, err := dial("close-admin", 0)
	if err != nil {
		return err
	}
	defer admin.quietClose()
	ach, err := admin.Channel()
	if err != nil {
		return err
	}
	q := name("close")
	if err := declare(ach, q, nil); err != nil {
		return err
	}
	// amqp091-go: a clean Close() closes NotifyClose without a value. A
	// server that drops TCP right after Close-Ok races the library's reader
	// (EOF -> 501) against Close's own shutdown, so check it 20 times.
	const n = 20
	var bad []string
	for i := 0; i < n; i++ {
		qq := ""
		if i == 0 {
			qq = q
		}
		reported, err := closeOnce(i, qq)
		if err != nil {
			return fmt.Errorf("connection %d: %w", i, err)
		}
		if reported != "" {
			bad = append(bad, fmt.Sprintf("#%d: %s", i, reported))
		}
	}
	// the closed connection's consumer goes away (asynchronously for the
	// broker, so poll); the queue stays for others
	start := time.Now()
	for {
		_, consumers, err := ready(ach, q)
		if err != nil {
			return fmt.Errorf("after the clean close: %w", err)
		}
		if consumers == 0 {
			break
		}
		if time.Since(start) > 5*time.Second {
			return fmt.Errorf("queue %s still has %d consumer(s) %v after its connection closed", q, consumers, time.Since(start))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := ach.QueueDelete(q, false, false, false); err != nil {
		return err
	}
	if err := admin.shut(); err != nil {
		return err
	}
	if len(bad) > 0 {
		return fmt.Errorf("%d of %d clean Close() calls (Close() returned nil) were followed by an error on NotifyClose: %s",
			len(bad), n, strings.Join(bad[:min(3, len(bad))], " "))
	}
	return nil
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}

// ------------------------------------------------------------------ 14. exclusive: gone at once

// RabbitMQ deletes a connection's exclusive queues before it sends
// Connection.Close-Ok, so once Close() returned, another connection's
// passive declare (on a channel opened beforehand) is a 404. 20 rounds.
func stepExclusiveGoneAtOnce() error {
	const rounds = 20
	outcomes := map[string]int{}
	for i := 0; i < rounds; i++ {
		a, err := dial(fmt.Sprintf("excl-now-owner-%d", i), 0)
		if err != nil {
			return err
		}
		b, err := dial(fmt.Sprintf("excl-now-other-%d", i), 0)
		if err != nil {
			a.quietClose()
			return err
		}
		err = func() error {
			ach, err := a.Channel()
			if err != nil {
				return err
			}
			q := name(fmt.Sprintf("exclusive-now-%d", i))
			if _, err := ach.QueueDeclare(q, false, false, true, false, qargs(nil)); err != nil {
				return err
			}
			bch, err := b.Channel()
			if err != nil {
				return err
			}
			if err := a.shut(); err != nil {
				return err
			}
			out := probeExclusive(bch, q)
			outcomes[out]++
			switch out {
			case "404":
			case "405", "visible":
				// clean up after the check: wait until the queue is gone
				deadline := time.Now().Add(5 * time.Second)
				for out != "404" && time.Now().Before(deadline) {
					if out == "visible" {
						if _, err := bch.QueueDelete(q, false, false, false); err != nil {
							return err
						}
					}
					if bch, err = b.Channel(); err != nil {
						return err
					}
					out = probeExclusive(bch, q)
					if out != "404" {
						time.Sleep(10 * time.Millisecond)
					}
				}
			default:
				return fmt.Errorf("round %d: %s", i, out)
			}
			return b.shut()
		}()
		a.quietClose()
		b.quietClose()
		if err != nil {
			return fmt.Errorf("round %d: %w", i, err)
		}
	}
	if outcomes["404"] != rounds {
		return fmt.Errorf("exclusive queue not gone when its owner's Close() returned: %d of %d rounds; another connection's "+
			"passive declare right after: 404 x%d, 405 RESOURCE_LOCKED x%d, succeeded (queue visible and usable) x%d",
			rounds-outcomes["404"], rounds, outcomes["404"], outcomes["405"], outcomes["visible"])
	}
	return nil
}

// ------------------------------------------------------------------ main

func main() {
	if len(os.Args) < 3 {
		fmt.Println("usage: amqp091_features HOST PORT [STEP...]   (default: all steps)")
		os.Exit(2)
	}
	host, port = os.Args[1], os.Args[2]
	suffix = hex.EncodeToString(randBytes(6))
	steps := []struct {
		name string
		fn   func() error
	}{
		{"qos prefetch 5, manual ack/nack/reject", stepQos},
		{"concurrent consumers on several channels", stepConcurrentConsumers},
		{"publisher confirms", stepConfirms},
		{"mandatory publish returned 312 NO_ROUTE", stepMandatory},
		{"consumer cancel notification", stepCancelNotify},
		{"transactions", stepTx},
		{"exchange-to-exchange and headers routing", stepRouting},
		{"large bodies (1 MiB, 5 MiB; frame_max default and 4096)", stepLargeBodies},
		{"channel errors 404/406 close only the channel", stepChannelErrors},
		{"direct reply-to", stepDirectReplyTo},
		{"100 channels and 20 connections churn", stepChurn},
		{"exclusive queue 405 / gone with its owner", stepExclusive},
		{"clean Connection.Close", stepCleanClose},
		{"exclusive queue gone when its owner's Close() returns", stepExclusiveGoneAtOnce},
	}
	selected := map[int]bool{}
	for _, a := range os.Args[3:] {
		n, err := strconv.Atoi(a)
		if err != nil || n < 1 || n > len(steps) {
			fmt.Printf("bad step %q (1..%d)\n", a, len(steps))
			os.Exit(2)
		}
		selected[n] = true
	}
	fmt.Printf("go features against %s:%s (suffix %s)\n", host, port, suffix)
	t0 := time.Now()
	for i, s := range steps {
		if len(selected) > 0 && !selected[i+1] {
			continue
		}
		start := time.Now()
		res := make(chan error, 1)
		go func(f func() error) { res <- f() }(s.fn)
		var err error
		select {
		case err = <-res:
		case <-time.After(stepTimeout):
			buf := make([]byte, 1<<20)
			n := runtime.Stack(buf, true)
			fmt.Fprintf(os.Stderr, "%s\n", buf[:n])
			err = fmt.Errorf("step timed out after %v (goroutines dumped to stderr)", stepTimeout)
		}
		if err != nil {
			fmt.Printf("FAIL step %d (%s): %v\n", i+1, s.name, err)
			os.Exit(1)
		}
		fmt.Printf("ok %2d %s (%v)\n", i+1, s.name, time.Since(start).Round(time.Millisecond))
	}
	fmt.Printf("go features ok (%v)\n", time.Since(t0).Round(time.Millisecond))
}
