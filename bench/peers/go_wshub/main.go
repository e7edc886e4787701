// go_wshub: the Go peer for bench/chat_fanout — a chat hub in the shape of
// gorilla/websocket's own chat example (Debian's golang-github-gorilla-websocket-dev):
// one hub goroutine owns the rooms; each client has a read pump, a write pump
// and a buffered send channel of 256; a client whose channel is full is
// dropped, as in the example.
//
// It speaks the part of netkit's chat protocol the bench uses:
//
//	→ {"type":"join","room":R}
//	→ {"type":"say","room":R,"text":T}
//	← {"type":"message","room":R,"id":N,"from":NICK,"text":T,"ts":MILLIS} to every member, the sender too
//
// Unlike the example's write pump, which gathers queued messages into one
// frame separated by newlines, this one writes one frame per message, as
// netkit does (a client of netkit's protocol reads one JSON object per frame).
// It stores nothing and has no limits beyond the example's: it is what Go
// costs for the same fan-out, not a second netkit.
//
// Prints its bound address on stdout.
//
// usage: go_wshub ADDR
package main

import (
	"encoding/json"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

const (
	writeWait      = 10 * time.Second
	pongWait       = 60 * time.Second
	pingPeriod     = (pongWait * 9) / 10
	maxMessageSize = 64 * 1024
	sendBuffer     = 256
)

type inbound struct {
	Type string `json:"type"`
	Room string `json:"room"`
	Text string `json:"text"`
}

type event struct {
	Type string `json:"type"`
	Room string `json:"room"`
	ID   uint64 `json:"id"`
	From string `json:"from"`
	Text string `json:"text"`
	Ts   int64  `json:"ts"`
}

type said struct {
	from *client
	room string
	text string
}

type membership struct {
	c    *client
	room string
}

type client struct {
	hub  *hub
	conn *websocket.Conn
	send chan []byte
	nick string
}

type hub struct {
	rooms      map[string]map[*client]bool
	joined     map[*client][]string
	say        chan said
	register   chan *client
	join       chan membership
	unregister chan *client
	ids        map[string]uint64
}

func newHub() *hub {
	return &hub{
		rooms:      map[string]map[*client]bool{},
		joined:     map[*client][]string{},
		say:        make(chan said, 256),
		register:   make(chan *client),
		join:       make(chan membership),
		unregister: make(chan *client),
		ids:        map[string]uint64{},
	}
}

func (h *hub) drop(c *client) {
	if _, ok := h.joined[c]; !ok {
		return
	}
	for _, r := range h.joined[c] {
		delete(h.rooms[r], c)
	}
	delete(h.joined, c)
	close(c.send)
}

func (h *hub) run() {
	for {
		select {
		case c := <-h.register:
			h.joined[c] = nil
		case m := <-h.join:
			if h.rooms[m.room] == nil {
				h.rooms[m.room] = map[*client]bool{}
			}
			if !h.rooms[m.room][m.c] {
				h.rooms[m.room][m.c] = true
				h.joined[m.c] = append(h.joined[m.c], m.room)
			}
		case c := <-h.unregister:
			h.drop(c)
		case s := <-h.say:
			members := h.rooms[s.room]
			if !members[s.from] {
				continue
			}
			h.ids[s.room]++
			b, err := json.Marshal(event{"message", s.room, h.ids[s.room], s.from.nick, s.text, time.Now().UnixMilli()})
			if err != nil {
				continue
			}
			for c := range members {
				select {
				case c.send <- b:
				default:
					h.drop(c)
				}
			}
		}
	}
}

func (c *client) readPump() {
	defer func() {
		c.hub.unregister <- c
		c.conn.Close()
	}()
	c.conn.SetReadLimit(maxMessageSize)
	c.conn.SetReadDeadline(time.Now().Add(pongWait))
	c.conn.SetPongHandler(func(string) error { c.conn.SetReadDeadline(time.Now().Add(pongWait)); return nil })
	for {
		_, raw, err := c.conn.ReadMessage()
		if err != nil {
			return
		}
		var m inbound
		if json.Unmarshal(raw, &m) != nil {
			continue
		}
		switch m.Type {
		case "join":
			c.hub.join <- membership{c, m.Room}
		case "say":
			c.hub.say <- said{c, m.Room, m.Text}
		}
	}
}

func (c *client) writePump() {
	ticker := time.NewTicker(pingPeriod)
	defer func() {
		ticker.Stop()
		c.conn.Close()
	}()
	for {
		select {
		case b, ok := <-c.send:
			c.conn.SetWriteDeadline(time.Now().Add(writeWait))
			if !ok {
				c.conn.WriteMessage(websocket.CloseMessage, []byte{})
				return
			}
			if err := c.conn.WriteMessage(websocket.TextMessage, b); err != nil {
				return
			}
		case <-ticker.C:
			c.conn.SetWriteDeadline(time.Now().Add(writeWait))
			if err := c.conn.WriteMessage(websocket.PingMessage, nil); err != nil {
				return
			}
		}
	}
}

var upgrader = websocket.Upgrader{
	ReadBufferSize:  1024,
	WriteBufferSize: 1024,
	CheckOrigin:     func(*http.Request) bool { return true },
}

var guests atomic.Uint64

func main() {
	if len(os.Args) != 2 {
		log.Fatal("usage: go_wshub ADDR")
	}
	l, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(l.Addr().String())
	h := newHub()
	go h.run()
	http.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		conn, err := upgrader.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		c := &client{hub: h, conn: conn, send: make(chan []byte, sendBuffer),
			nick: fmt.Sprintf("guest%d", guests.Add(1))}
		// Registered before its pumps start, so drop() always finds it.
		h.register <- c
		go c.writePump()
		go c.readPump()
	})
	log.Fatal(http.Serve(l, nil))
}
