"""One job at a time on the model: the UI and the HTTP API share this lock (A1111 name)."""
import threading
from functools import wraps

queue_lock = threading.Lock()


def wrap_queued_call(func):
    @wraps(func)
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)
    return f
