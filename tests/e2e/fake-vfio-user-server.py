#!/usr/bin/env python3
"""A misbehaving vfio-user server, for QEMU's client to survive.

usage: fake-vfio-user-server.py MODE SOCKET

Listens on SOCKET, serves one connection, then exits. MODE:
  close-unread     close without reading QEMU's VERSION request (the kernel
                   then resets the connection: QEMU's read gets ECONNRESET)
  close-mid-reply  read VERSION, send the first 10 bytes of a 200-byte reply
                   body, close
  wrong-id         read VERSION, send a well-formed reply with another msg_id,
                   keep the connection open
  garbage          read VERSION, send 64 bytes of noise, keep it open
  no-caps          read VERSION, reply with the version numbers but no
                   capabilities string, keep it open
  silent           read VERSION, never answer, keep it open
  other-device     a well-behaved server of another device: answers VERSION
                   (capabilities as airlock's edu: 4 KiB pages, the whole
                   IOVA space usable), DMA_MAP/UNMAP, and DEVICE_GET_INFO
                   with 2 regions and 1 IRQ index (edu has 9 and 5); every
                   other request gets EINVAL. For a reconnecting client,
                   which must refuse to resume its device on this one.
Prints one line per event on stdout ("fake-server: ...").
"""
import json
import os
import socket
import struct
import sys
import time

HDR = struct.Struct("<HHIII")  # id, command, size, flags, error
VERSION = 1
REPLY = 0x1


def log(msg):
    print(f"fake-server: {msg}", flush=True)


def read_msg(conn):
    hdr = b""
    while len(hdr) < HDR.size:
        chunk = conn.recv(HDR.size - len(hdr))
        if not chunk:
            return None
        hdr += chunk
    msg_id, cmd, size, flags, _ = HDR.unpack(hdr)
    body = b""
    while len(body) < size - HDR.size:
        chunk = conn.recv(size - HDR.size - len(body))
        if not chunk:
            break
        body += chunk
    log(f"got msg id {msg_id} command {cmd} size {size}")
    return msg_id, cmd, body


def version_reply(msg_id):
    caps = json.dumps({"capabilities": {"max_msg_fds": 16, "pgsizes": 4096}}).encode() + b"\0"
    body = struct.pack("<HH", 0, 0) + caps
    return HDR.pack(msg_id, VERSION, HDR.size + len(body), REPLY, 0) + body


def serve_other_device(conn):
    caps = json.dumps({"capabilities": {
        "max_msg_fds": 16, "pgsizes": 4096, "max_dma_maps": 65535,
        "max_data_xfer_size": 1048576,
        "iova_ranges": [{"start": 0, "end": 2**64 - 1}]}}).encode() + b"\0"
    while True:
        msg = read_msg(conn)
        if msg is None:
            return
        msg_id, cmd, _ = msg
        if cmd == VERSION:
            body = struct.pack("<HH", 0, 0) + caps
            conn.sendall(HDR.pack(msg_id, cmd, HDR.size + len(body), REPLY, 0) + body)
        elif cmd in (2, 3):  # DMA_MAP, DMA_UNMAP
            conn.sendall(HDR.pack(msg_id, cmd, HDR.size, REPLY, 0))
        elif cmd == 4:  # DEVICE_GET_INFO: flags PCI|RESET, 2 regions, 1 irq index
            body = struct.pack("<IIII", 16, 0x3, 2, 1)
            conn.sendall(HDR.pack(msg_id, cmd, HDR.size + len(body), REPLY, 0) + body)
            log("answered DEVICE_GET_INFO: 2 regions, 1 irq index")
        else:
            conn.sendall(HDR.pack(msg_id, cmd, HDR.size, REPLY | 0x20, 22))


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    mode, path = sys.argv[1], sys.argv[2]
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    log(f"listening on {path} ({mode})")
    srv.settimeout(60)
    conn, _ = srv.accept()
    log("client connected")
    if mode == "other-device":
        serve_other_device(conn)
        log("client closed")
        return
    if mode == "close-unread":
        time.sleep(0.5)  # QEMU's VERSION request is now unread in our buffer
        conn.close()
        log("closed with the request unread")
        return
    msg = read_msg(conn)
    if msg is None:
        log("client closed")
        return
    msg_id, _, _ = msg
    if mode == "close-mid-reply":
        conn.sendall(HDR.pack(msg_id, VERSION, HDR.size + 200, REPLY, 0) + b"\0" * 10)
        time.sleep(0.2)
        conn.close()
        log("closed in the middle of the reply")
        return
    if mode == "wrong-id":
        conn.sendall(version_reply((msg_id + 1000) & 0xFFFF))
        log(f"replied with msg_id {(msg_id + 1000) & 0xFFFF} instead of {msg_id}")
    elif mode == "no-caps":
        conn.sendall(HDR.pack(msg_id, VERSION, HDR.size + 4, REPLY, 0) + struct.pack("<HH", 0, 0))
        log("replied with no capabilities")
    elif mode == "garbage":
        conn.sendall(bytes((i * 37 + 11) & 0xFF for i in range(64)))
        log("sent 64 bytes of noise")
    elif mode == "silent":
        log("not answering")
    else:
        sys.exit(f"unknown mode {mode}")
    # Keep the connection open until QEMU gives up on it.
    conn.settimeout(30)
    try:
        while conn.recv(4096):
            pass
    except OSError:
        pass
    log("client closed")


if __name__ == "__main__":
    main()
