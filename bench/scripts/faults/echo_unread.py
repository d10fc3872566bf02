import socket, subprocess, sys, time, os, signal
exe, port = sys.argv[1], int(sys.argv[2])
p = subprocess.Popen([exe], env=dict(os.environ, PORT=str(port), WORKERS="1"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
p.stdout.readline()
time.sleep(0.3)
wpid = int(open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()[0])
s = socket.create_connection(("127.0.0.1", port)); s.settimeout(2)
line = b"x" * 1000 + b"\n"; n = 0
try:
    while n < 50e6: s.sendall(line * 100); n += len(line) * 100
except socket.timeout: pass
hwm = [l for l in open(f"/proc/{wpid}/status") if l.startswith("VmHWM")][0].split()[1]
print(f"server stopped reading after {n/1e6:.1f} MB of lines; worker peak RSS {int(hwm)//1024} MB")
s.settimeout(10); got = 0
while got < n:
    d = s.recv(1 << 20)
    if not d: break
    got += d.count(b"\n") * 1001
print("answers read back:", got >= n)
p.send_signal(signal.SIGTERM); p.wait(timeout=10)
