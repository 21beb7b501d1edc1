# Runs inside a kernelexec sandbox: `kernelexec run examples/hello.py`
# Nothing here touches the host: the file's text is sent to a kernel in its own container.
import os
import socket

import pandas as pd

print("hello from the sandbox")
df = pd.DataFrame({"city": ["Lyon", "Oslo", "Quito"], "temp": [14.5, 6.1, 19.0]})
print(df.describe().loc[["mean", "max"]])
print("running as uid", os.getuid(), "with network interfaces", os.listdir("/sys/class/net"))
try:
    socket.create_connection(("192.0.2.1", 80), timeout=5)
except OSError as e:
    print("outbound connection:", e.strerror)
try:
    open("/usr/evil", "w")
except OSError as e:
    print("writing to /usr:", e.strerror)
# the value of the last line is the run's result, printed by `kernelexec run`
round(df.temp.mean(), 2)
