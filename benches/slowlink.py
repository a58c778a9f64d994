#!/usr/bin/env python3
"""A TCP proxy that behaves like a slow link: one-way delay and a rate limit.

This machine's kernel has no netem qdisc, so the link is emulated here, in
user space, between the clients (hyperboxd, containerd) and the registry:

- every byte read from one side is written to the other side no earlier
  than DELAY ms after it arrived (propagation; so a request and its answer
  cost one round trip of 2 x DELAY, and opening a connection costs one more);
- each direction is one shared link of RATE bit/s: a segment's transmission
  starts when the link is free and takes len*8/RATE seconds (serialization;
  connections in parallel share the bandwidth, as on a real link).

TCP's own slow start and loss are not modelled.

    slowlink.py LISTEN_PORT TARGET_HOST:PORT RATE_MBIT DELAY_MS
"""
import asyncio
import sys

CHUNK = 64 * 1024


class Link:
    """One direction of the link: shared by every connection."""

    def __init__(self, rate_bps, delay_s):
        self.rate = rate_bps
        self.delay = delay_s
        self.free_at = 0.0

    def schedule(self, now, nbytes):
        start = max(now, self.free_at)
        self.free_at = start + nbytes * 8 / self.rate
        return self.free_at + self.delay


async def pump(reader, writer, link):
    # Segments in arrival order, each with its delivery time: the sender
    # reads ahead (as a real link holds bytes in flight) and the writer
    # delivers in order.
    queue = asyncio.Queue()

    async def deliver():
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    task = asyncio.create_task(deliver())
    loop = asyncio.get_running_loop()
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            await queue.put((link.schedule(loop.time(), len(data)), data))
    except (ConnectionError, OSError):
        pass
    await queue.put((0, None))
    try:
        await task
    except (ConnectionError, OSError):
        pass


def main():
    listen_port, target, rate_mbit, delay_ms = sys.argv[1:5]
    host, port = target.rsplit(":", 1)
    up = Link(float(rate_mbit) * 1e6, float(delay_ms) / 1e3)
    down = Link(float(rate_mbit) * 1e6, float(delay_ms) / 1e3)

    async def handle(creader, cwriter):
        # Connection set-up: SYN out, SYN-ACK back.
        await asyncio.sleep(2 * up.delay)
        try:
            sreader, swriter = await asyncio.open_connection(host, int(port))
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(pump(creader, swriter, up), pump(sreader, cwriter, down))

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", int(listen_port))
        print(f"slowlink: 127.0.0.1:{listen_port} -> {target}, {rate_mbit} Mbit/s, {delay_ms} ms each way",
              flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
