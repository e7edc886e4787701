// go_tls: the baseline for bench/tls — Go's net/http serving GET /healthz over
// TLS with ListenAndServeTLS's defaults, from the same certificate and key as
// netkit. Prints its bound address on stdout.
//
// usage: go_tls ADDR CERT.pem KEY.pem
package main

import (
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
)

func main() {
	if len(os.Args) != 4 {
		log.Fatal("usage: go_tls ADDR CERT.pem KEY.pem")
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
	fmt.Println(ln.Addr().String())
	srv := &http.Server{Handler: mux}
	log.Fatal(srv.ServeTLS(ln, os.Args[2], os.Args[3]))
}
