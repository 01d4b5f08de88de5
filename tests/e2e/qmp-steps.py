#!/usr/bin/env python3
"""Run QMP steps over one connection, printing each result with its time.

usage: qmp-steps.py SOCKET STEP...
  STEP is a QMP command as JSON ('{"execute": "query-status"}'),
  'wait:EVENT:SECONDS' (wait for an event, e.g. DEVICE_DELETED), or
  'sleep:SECONDS'.
Prints one line per step:
  qmp <command> <elapsed s> <reply or event JSON>
Exit 0 when every step ran (QMP errors are results, not failures); 1 if the
connection broke; 2 if an awaited event did not come in time.
"""
import json
import socket
import sys
import time


def main():
    path, steps = sys.argv[1], sys.argv[2:]
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(path)
    f = s.makefile("rw")
    events = []

    def read():
        line = f.readline()
        if not line:
            raise EOFError("QMP connection closed")
        return json.loads(line)

    def command(cmd):
        f.write(json.dumps(cmd) + "\n")
        f.flush()
        while True:
            r = read()
            if "return" in r or "error" in r:
                return r
            if "event" in r:
                events.append(r)

    read()  # greeting
    command({"execute": "qmp_capabilities"})
    rc = 0
    for step in steps:
        t0 = time.monotonic()
        try:
            if step.startswith("sleep:"):
                time.sleep(float(step.split(":")[1]))
                continue
            if step.startswith("wait:"):
                _, name, secs = step.split(":")
                deadline = t0 + float(secs)
                got = None
                while got is None:
                    got = next((e for e in events if e["event"] == name), None)
                    if got is not None:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    s.settimeout(left)
                    try:
                        r = read()
                    except socket.timeout:
                        break
                    if "event" in r:
                        events.append(r)
                s.settimeout(60)
                dt = time.monotonic() - t0
                if got is None:
                    print(f"qmp wait:{name} {dt:.2f} timeout", flush=True)
                    rc = 2
                else:
                    events.remove(got)
                    print(f"qmp wait:{name} {dt:.2f} {json.dumps(got)}", flush=True)
                continue
            cmd = json.loads(step)
            r = command(cmd)
            dt = time.monotonic() - t0
            print(f"qmp {cmd['execute']} {dt:.2f} {json.dumps(r)}", flush=True)
        except (EOFError, OSError) as e:
            print(f"qmp {step[:40]} {time.monotonic() - t0:.2f} broken: {e}", flush=True)
            return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
