#!/usr/bin/env python3
"""A recording proxy for unix stream sockets (makes the captured fuzz seeds).

capture.py LISTEN UPSTREAM PREFIX

Accepts connections on LISTEN, connects each one to UPSTREAM and relays bytes both ways,
writing what the client sent to PREFIX.N.c2s and what the server sent to PREFIX.N.s2c
(N counts connections from 1). Runs until killed.
"""
import os
import selectors
import socket
import sys
import threading


def relay(n, client, upstream_path, prefix):
    up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    up.connect(upstream_path)
    files = {client: open(f"{prefix}.{n}.c2s", "wb"), up: open(f"{prefix}.{n}.s2c", "wb")}
    peer = {client: up, up: client}
    sel = selectors.DefaultSelector()
    for s in (client, up):
        sel.register(s, selectors.EVENT_READ)
    open_ends = 2
    while open_ends:
        for key, _ in sel.select():
            s = key.fileobj
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                open_ends -= 1
                try:
                    peer[s].shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                continue
            files[s].write(data)
            files[s].flush()
            try:
                peer[s].sendall(data)
            except OSError:
                # The other side went away: keep recording what this side still sends.
                pass
    for f in files.values():
        f.close()
    client.close()
    up.close()


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    listen, upstream, prefix = sys.argv[1:]
    if os.path.exists(listen):
        os.unlink(listen)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(listen)
    srv.listen(16)
    n = 0
    while True:
        c, _ = srv.accept()
        n += 1
        threading.Thread(target=relay, args=(n, c, upstream, prefix), daemon=True).start()


if __name__ == "__main__":
    main()
