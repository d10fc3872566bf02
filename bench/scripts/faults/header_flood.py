# One client sends a header that never ends (up to 40 MB) to cluster_hello (WORKERS=1);
# meanwhile keep-alive clients count answers for 3 s. Prints what the flooder got,
# the requests others got served, and the worker's CPU time and peak RSS.
import socket, subprocess, sys, time, threading, os, signal
port = int(sys.argv[2]); exe = sys.argv[1]
p = subprocess.Popen([exe], env=dict(os.environ, PORT=str(port), WORKERS="1"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
assert p.stdout.readline().strip() == b"ready"
# worker pid: the child of p
kids = open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()
wpid = int(kids[0])
res = {}
def flood():
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: ")
    sent = 0; chunk = b"a" * 65536
    try:
        while sent < 40_000_000:
            s.sendall(chunk); sent += len(chunk)
    except OSError as e:
        res["flood_err"] = str(e)
    res["flood_sent"] = sent
    s.settimeout(2)
    try: res["flood_reply"] = s.recv(200)[:60]
    except Exception as e: res["flood_reply"] = repr(e)
t = threading.Thread(target=flood); t.start()
served = 0
c = socket.create_connection(("127.0.0.1", port)); c.settimeout(5)
t0 = time.time()
while time.time() - t0 < 3:
    c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    buf = b""
    while not buf.endswith(b"hello world\n"):
        buf += c.recv(4096)
    served += 1
t.join()
stat = open(f"/proc/{wpid}/stat").read().split()
cpu = (int(stat[13]) + int(stat[14])) / os.sysconf("SC_CLK_TCK")
hwm = [l for l in open(f"/proc/{wpid}/status") if l.startswith("VmHWM")][0].split()[1]
print(f"flooder sent {res.get('flood_sent')} bytes, got {res.get('flood_reply')!r}; others served {served} requests in 3 s; worker CPU {cpu:.2f} s, peak RSS {int(hwm)//1024} MB")
p.send_signal(signal.SIGTERM); p.wait(timeout=10)
