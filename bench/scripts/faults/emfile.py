# The EMFILE recipe: cluster_hello under `ulimit -n 64`, N idle connections
# held for 2 s, then 5 requests (curl-like, one connection each). Prints served/5.
import socket, subprocess, sys, time, os, signal, resource
exe, port, workers, idle_n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def lim(): resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
p = subprocess.Popen([exe], env=dict(os.environ, PORT=str(port), WORKERS=workers), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, preexec_fn=lim)
assert p.stdout.readline().strip() == b"ready"
idle = []
for i in range(idle_n):
    try: idle.append(socket.create_connection(("127.0.0.1", port), timeout=2))
    except OSError as e: print("idle err", e); break
print("idle opened", len(idle))
time.sleep(2)   # the recipe holds them 2 s (a measurement script, not a test)
for s in idle: s.close()
served = 0
for i in range(5):
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        buf = b""
        while True:
            d = c.recv(4096)
            if not d: break
            buf += d
        served += buf.endswith(b"hello world\n")
        if not buf.endswith(b"hello world\n"): print("got", buf[:80])
    except OSError as e: print("err", e)
print(f"workers={workers} idle={idle_n}: served {served}/5")
p.send_signal(signal.SIGTERM); p.wait(timeout=15)
