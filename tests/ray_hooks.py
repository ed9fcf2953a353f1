"""Fault injection for tests/test_ray.py, installed in every Ray worker of the test cluster through
Ray's `worker_process_setup_hook`: when the test arms it, the first worker to write shard bytes
records its pid and stops there until the test kills it (a real SIGKILL of a real worker mid-shard)."""
import os
import time


def pause_after_first_write() -> None:
    d = os.environ.get("CHIMERA_TEST_PAUSE_DIR")
    if not d:
        return
    from chimera.checkpoint import writer

    write = writer.ShardFile.write

    def paused(self, *args, **kwargs):
        write(self, *args, **kwargs)
        if not os.path.exists(os.path.join(d, "armed")):
            return
        try:
            fd = os.open(os.path.join(d, "claimed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()} {self.tmp}".encode())
        os.close(fd)
        time.sleep(600)  # until killed

    writer.ShardFile.write = paused
