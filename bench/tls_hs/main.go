// tls_hs: full TLS handshakes against a server, each on a new connection
// (connect, handshake, close; no session resumption). With -rate it offers that
// many handshakes per second, paced, for -d; with -rate 0 it runs -c workers as
// fast as they go. Prints one JSON line: handshakes done, errors, offers the
// workers could not take in time (missed), and the achieved rate.
//
// usage: tls_hs -addr HOST:PORT -ca CERT.pem [-rate 1000] [-c 64] [-d 5s]
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"log"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	addr := flag.String("addr", "", "server HOST:PORT")
	ca := flag.String("ca", "", "PEM certificate the server presents (trusted as the only root)")
	rate := flag.Int("rate", 1000, "handshakes per second to offer; 0 runs the workers flat out")
	workers := flag.Int("c", 64, "concurrent connections at most")
	dur := flag.Duration("d", 5*time.Second, "how long to run")
	flag.Parse()
	pem, err := os.ReadFile(*ca)
	if err != nil {
		log.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		log.Fatal("no certificate in -ca")
	}
	host, _, _ := net.SplitHostPort(*addr)
	// No ClientSessionCache: every handshake is a full one.
	cfg := &tls.Config{RootCAs: roots, ServerName: host}
	var ok, errs, missed atomic.Int64
	one := func() {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", *addr, cfg)
		if err != nil {
			errs.Add(1)
			return
		}
		c.Close()
		ok.Add(1)
	}
	start := time.Now()
	end := start.Add(*dur)
	jobs := make(chan struct{}, *workers)
	var wg sync.WaitGroup
	for i := 0; i < *workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if *rate == 0 {
				for time.Now().Before(end) {
					one()
				}
				return
			}
			for range jobs {
				one()
			}
		}()
	}
	if *rate > 0 {
		// Offer handshakes on a fixed schedule; an offer no worker can take
		// within its slot is counted as missed rather than queued.
		interval := time.Second / time.Duration(*rate)
		for next := start; next.Before(end); next = next.Add(interval) {
			time.Sleep(time.Until(next))
			select {
			case jobs <- struct{}{}:
			default:
				missed.Add(1)
			}
		}
		close(jobs)
	}
	wg.Wait()
	secs := time.Since(start).Seconds()
	json.NewEncoder(os.Stdout).Encode(map[string]any{
		"handshakes": ok.Load(), "errors": errs.Load(), "missed": missed.Load(),
		"seconds": secs, "rate": float64(ok.Load()) / secs,
	})
}
