"""Error reporting that never stops the job (A1111 module name)."""
import sys
import traceback

_already_displayed: set = set()


def report(message: str, *, exc_info: bool = False) -> None:
    """Prints a message (and the current exception's traceback) to stderr."""
    for line in message.splitlines():
        print("***", line, file=sys.stderr)
    if exc_info:
        print(traceback.format_exc(), file=sys.stderr)
        print("---", file=sys.stderr)


def display(e: Exception, task: str, *, full_traceback: bool = False) -> None:
    print(f"{task or 'error'}: {type(e).__name__}", file=sys.stderr)
    te = traceback.TracebackException.from_exception(e)
    print("".join(te.format()), file=sys.stderr)


def display_once(e: Exception, task: str) -> None:
    if task in _already_displayed:
        return
    display(e, task)
    _already_displayed.add(task)


def run(code, task: str) -> None:
    try:
        code()
    except Exception as e:
        display(e, task)


class JobInputError(ValueError):
    """A job's parameters cannot be run (an unknown upscaler, a denoising strength out of range, no init image):
    the message names the parameter; the API answers 422 with it."""
