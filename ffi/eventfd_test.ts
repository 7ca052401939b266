import assert from "node:assert/strict";
import { EventFd } from "./eventfd.ts";
import { memfdCreate } from "./memory.ts";
import { socketPair } from "./socket.ts";

Deno.test("EventFd signal adds to the counter and drain reads and resets it", () => {
  using ev = new EventFd({ label: "test ev" });
  assert.equal(ev.drain(), 0n);
  assert.equal(ev.signal(), true);
  assert.equal(ev.signal(5n), true);
  assert.equal(ev.drain(), 6n);
  assert.equal(ev.drain(), 0n);
  assert.equal(ev.fd.label, "test ev");
  assert.match(Deno.readLinkSync(`/proc/self/fd/${ev.fd.unsafeFd}`), /anon_inode:\[eventfd\]/);
});

Deno.test("EventFd signal reports a full counter as false instead of blocking", () => {
  using ev = new EventFd();
  assert.equal(ev.signal(0xfffffffffffffffen), true);
  assert.equal(ev.signal(1n), false);
  assert.equal(ev.drain(), 0xfffffffffffffffen);
});

Deno.test("EventFd passed over a socket signals the same counter", () => {
  using ev = new EventFd();
  const [a, b] = socketPair();
  try {
    a.sendMsg(new Uint8Array([0]), [ev.fd]);
    const got = b.recvMsg(new Uint8Array(1));
    assert.ok(got);
    using other = new EventFd(got.fds[0]);
    other.signal(3n);
    assert.equal(ev.drain(), 3n);
  } finally {
    a.close();
    b.close();
  }
  // An EventFd over a non-eventfd fd fails on use with the fd's label.
  using mem = new EventFd(memfdCreate("not-an-eventfd"));
  assert.equal(mem.drain(), 0n, "a memfd at EOF reads 0 bytes");
});
