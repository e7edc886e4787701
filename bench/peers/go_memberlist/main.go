// bench/peers/go_memberlist: hashicorp/memberlist (Debian's package, LAN
// defaults) as a node for ../shared/bench/cluster_probe.py, the peer that
// bench/cluster measures netkit's gossip against in the same run.
//
//	go_memberlist -name n1 -bind 127.0.0.1:7946 -join 127.0.0.1:7945
//
// Every 100 ms it prints {"members":N,"suspect":S,"tx_bytes":B,"tx_pkts":P}
// where B and P count the UDP datagrams it sent (a wrapped transport), as
// netkit's --status-json does.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// counting wraps the UDP side of memberlist's own transport.
type counting struct {
	*memberlist.NetTransport
	bytes, pkts uint64
}

func (c *counting) WriteTo(b []byte, addr string) (time.Time, error) {
	atomic.AddUint64(&c.pkts, 1)
	atomic.AddUint64(&c.bytes, uint64(len(b)))
	return c.NetTransport.WriteTo(b, addr)
}

// WriteToAddress is what memberlist calls on a node-aware transport such as
// NetTransport; WriteTo above is its fallback.
func (c *counting) WriteToAddress(b []byte, addr memberlist.Address) (time.Time, error) {
	atomic.AddUint64(&c.pkts, 1)
	atomic.AddUint64(&c.bytes, uint64(len(b)))
	return c.NetTransport.WriteToAddress(b, addr)
}

func main() {
	name := flag.String("name", "", "node name")
	bind := flag.String("bind", "127.0.0.1:0", "HOST:PORT for gossip (UDP and TCP)")
	join := flag.String("join", "", "seed HOST:PORT (empty for the first node)")
	flag.Parse()
	host, portS, err := net.SplitHostPort(*bind)
	if err != nil {
		log.Fatal(err)
	}
	port, _ := strconv.Atoi(portS)
	cfg := memberlist.DefaultLANConfig()
	cfg.Name = *name
	cfg.BindAddr, cfg.BindPort = host, port
	cfg.AdvertiseAddr, cfg.AdvertisePort = host, port
	cfg.LogOutput = io.Discard
	nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{
		BindAddrs: []string{host}, BindPort: port, Logger: log.New(io.Discard, "", 0)})
	if err != nil {
		log.Fatal(err)
	}
	tr := &counting{NetTransport: nt}
	cfg.Transport = tr
	ml, err := memberlist.Create(cfg)
	if err != nil {
		log.Fatal(err)
	}
	if s := strings.TrimSpace(*join); s != "" {
		go func() {
			for {
				if _, err := ml.Join([]string{s}); err == nil {
					return
				}
				time.Sleep(200 * time.Millisecond)
			}
		}()
	}
	enc := json.NewEncoder(os.Stdout)
	for range time.Tick(100 * time.Millisecond) {
		err := enc.Encode(map[string]interface{}{
			"ts":       float64(time.Now().UnixNano()) / 1e9,
			"members":  ml.NumMembers(),
			"tx_bytes": atomic.LoadUint64(&tr.bytes),
			"tx_pkts":  atomic.LoadUint64(&tr.pkts),
		})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
}
