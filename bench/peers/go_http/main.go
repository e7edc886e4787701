// go_http: the baseline for bench/http — Go's net/http (plaintext, default
// http.Server settings) serving the two routes bench/http loads:
//
//   - GET /healthz: "ok\n" as text/plain.
//   - GET /api/rooms/{room}/messages: the page of messages read once at start
//     from PAGE.json (what netkit served for the same seeded room) and kept in
//     memory as Go values; every request encodes it again with encoding/json.
//     netkit reads SQLite per request; this peer does not (no database/sql):
//     it is the cost of net/http plus JSON encoding alone.
//
// Prints its bound address on stdout.
//
// usage: go_http ADDR PAGE.json
package main

import (
	"encoding/json"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
)

// message has the fields netkit's ChatMessage serialises for a plain message.
type message struct {
	Room string `json:"room"`
	ID   uint64 `json:"id"`
	From string `json:"from"`
	Text string `json:"text"`
	Ts   int64  `json:"ts"`
}

type page struct {
	Room     string    `json:"room"`
	Messages []message `json:"messages"`
}

func main() {
	if len(os.Args) != 3 {
		log.Fatal("usage: go_http ADDR PAGE.json")
	}
	raw, err := os.ReadFile(os.Args[2])
	if err != nil {
		log.Fatal(err)
	}
	var stored page
	if err := json.Unmarshal(raw, &stored); err != nil {
		log.Fatal(err)
	}
	ln, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprint(w, "ok\n")
	})
	mux.HandleFunc("/api/rooms/", func(w http.ResponseWriter, r *http.Request) {
		rest := strings.TrimPrefix(r.URL.Path, "/api/rooms/")
		room, tail, ok := strings.Cut(rest, "/")
		if !ok || tail != "messages" || room != stored.Room {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		if err := json.NewEncoder(w).Encode(stored); err != nil {
			log.Print(err)
		}
	})
	fmt.Println(ln.Addr().String())
	log.Fatal(http.Serve(ln, mux))
}
