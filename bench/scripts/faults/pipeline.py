# A client pipelines requests and never reads the answers, for at most 10 s or 400 MB;
# meanwhile a keep-alive client counts answers. Prints where the server stopped
# reading, the worker's peak RSS and the other client's count.
import socket, subprocess, sys, time, os, signal, threading
exe, port = sys.argv[1], int(sys.argv[2])
p = subprocess.Popen([exe], env=dict(os.environ, PORT=str(port), WORKERS="1"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
assert p.stdout.readline().strip() == b"ready"
wpid = int(open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()[0])
served = [0]; stop = [False]
def other():
    c = socket.create_connection(("127.0.0.1", port)); c.settimeout(5)
    while not stop[0]:
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"); buf = b""
        while not buf.endswith(b"hello world\n"): buf += c.recv(4096)
        served[0] += 1
t = threading.Thread(target=other); t.start()
s = socket.create_connection(("127.0.0.1", port)); s.settimeout(2)
r = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2000; n = 0; t0 = time.time()
try:
    while n < 400e6 and time.time() - t0 < 10: s.sendall(r); n += len(r)
except socket.timeout: pass
stop[0] = True; t.join()
hwm = [l for l in open(f"/proc/{wpid}/status") if l.startswith("VmHWM")][0].split()[1]
print(f"server stopped reading after {n/1e6:.1f} MB; worker peak RSS {int(hwm)//1024} MB; other client served {served[0]} in {time.time()-t0:.1f} s")
p.send_signal(signal.SIGKILL); p.wait()
