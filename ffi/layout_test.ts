import assert from "node:assert/strict";
import { addressOf, cstr, libc } from "./_libc.ts";
import { AF_UNIX, EPOLL_EVENT, IOVEC, MSGHDR, RLIMIT, SOCK_CLOEXEC, SOCKADDR_UN, STAT } from "./_layout.ts";
import { check } from "./errno.ts";
import { OwnedFd } from "./fd.ts";
import { memfdCreate } from "./memory.ts";

const SOCK_DGRAM = 2;

function sockaddr(path: string): Uint8Array<ArrayBuffer> {
  const sa = new Uint8Array(SOCKADDR_UN.size);
  new DataView(sa.buffer).setUint16(SOCKADDR_UN.family, AF_UNIX, true);
  sa.set(cstr(path), SOCKADDR_UN.path);
  return sa;
}

function dgram(path: string): OwnedFd {
  const fd = OwnedFd.unsafeAdopt(check("socket", libc.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0)), path);
  const sa = sockaddr(path);
  check("bind", libc.bind(fd.unsafeFd, sa, sa.byteLength), path);
  return fd;
}

Deno.test("layout msghdr/iovec/sockaddr_un offsets round-trip through the kernel's sendmsg and recvmsg", () => {
  const dir = Deno.makeTempDirSync({ prefix: "mpq-layout-" });
  const a = dgram(`${dir}/a`);
  const b = dgram(`${dir}/b`);
  try {
    // b sends to a, naming a in msg_name; a learns b's address from its msg_name.
    const payload = new TextEncoder().encode("layout!");
    const to = sockaddr(`${dir}/a`);
    const iov = new Uint8Array(IOVEC.size);
    const iv = new DataView(iov.buffer);
    iv.setBigUint64(IOVEC.base, addressOf(payload), true);
    iv.setBigUint64(IOVEC.len, BigInt(payload.byteLength), true);
    const msg = new Uint8Array(MSGHDR.size);
    const mv = new DataView(msg.buffer);
    mv.setBigUint64(MSGHDR.name, addressOf(to), true);
    mv.setUint32(MSGHDR.namelen, to.byteLength, true);
    mv.setBigUint64(MSGHDR.iov, addressOf(iov), true);
    mv.setBigUint64(MSGHDR.iovlen, 1n, true);
    assert.equal(check("sendmsg", libc.sendmsg(b.unsafeFd, msg, 0)), BigInt(payload.byteLength));

    const from = new Uint8Array(SOCKADDR_UN.size);
    const buf = new Uint8Array(64);
    const riov = new Uint8Array(IOVEC.size);
    const rv = new DataView(riov.buffer);
    rv.setBigUint64(IOVEC.base, addressOf(buf), true);
    rv.setBigUint64(IOVEC.len, BigInt(buf.byteLength), true);
    const rmsg = new Uint8Array(MSGHDR.size);
    const rmv = new DataView(rmsg.buffer);
    rmv.setBigUint64(MSGHDR.name, addressOf(from), true);
    rmv.setUint32(MSGHDR.namelen, from.byteLength, true);
    rmv.setBigUint64(MSGHDR.iov, addressOf(riov), true);
    rmv.setBigUint64(MSGHDR.iovlen, 1n, true);
    rmv.setInt32(MSGHDR.flags, -1, true);
    assert.equal(check("recvmsg", libc.recvmsg(a.unsafeFd, rmsg, 0)), BigInt(payload.byteLength));
    assert.deepEqual(buf.subarray(0, payload.byteLength), payload);
    const bPath = new TextEncoder().encode(`${dir}/b`);
    assert.equal(rmv.getUint32(MSGHDR.namelen, true), SOCKADDR_UN.path + bPath.byteLength + 1);
    assert.equal(new DataView(from.buffer).getUint16(SOCKADDR_UN.family, true), AF_UNIX);
    assert.deepEqual(from.subarray(SOCKADDR_UN.path, SOCKADDR_UN.path + bPath.byteLength), bPath);
    assert.equal(rmv.getBigUint64(MSGHDR.controllen, true), 0n);
    assert.equal(rmv.getInt32(MSGHDR.flags, true), 0, "the kernel wrote msg_flags at its offset");
  } finally {
    a.close();
    b.close();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("layout struct stat size and mode offsets match what Deno.statSync reports", () => {
  using fd = memfdCreate("layout-stat");
  check("ftruncate", libc.ftruncate(fd.unsafeFd, 123457n));
  const st = new Uint8Array(STAT.size);
  check("fstat", libc.fstat(fd.unsafeFd, st));
  const v = new DataView(st.buffer);
  const viaDeno = Deno.statSync(`/proc/self/fd/${fd.unsafeFd}`);
  assert.equal(Number(v.getBigInt64(STAT.size_, true)), 123457);
  assert.equal(viaDeno.size, 123457);
  assert.equal(v.getUint32(STAT.mode, true), viaDeno.mode);
});

Deno.test("layout epoll_event is packed: the 64-bit data field at offset 4 comes back intact", () => {
  using ep = OwnedFd.unsafeAdopt(check("epoll_create1", libc.epoll_create1(0o2000000)), "epoll");
  using ev = OwnedFd.unsafeAdopt(check("eventfd", libc.eventfd(1, 0o2000000)), "eventfd");
  const ctl = new Uint8Array(EPOLL_EVENT.size);
  const cv = new DataView(ctl.buffer);
  cv.setUint32(EPOLL_EVENT.events, 1, /* EPOLLIN */ true);
  cv.setBigUint64(EPOLL_EVENT.data, 0x1122334455667788n, true);
  check("epoll_ctl", libc.epoll_ctl(ep.unsafeFd, 1, ev.unsafeFd, ctl));
  const out = new Uint8Array(EPOLL_EVENT.size * 2).fill(0xee);
  assert.equal(check("epoll_wait", libc.epoll_wait(ep.unsafeFd, out, 2, 0)), 1);
  const ov = new DataView(out.buffer);
  assert.equal(ov.getUint32(EPOLL_EVENT.events, true), 1);
  assert.equal(ov.getBigUint64(EPOLL_EVENT.data, true), 0x1122334455667788n);
  assert.equal(out[EPOLL_EVENT.size], 0xee, "the kernel wrote exactly one 12-byte event");
});

Deno.test("layout struct rlimit matches /proc/self/limits", () => {
  const r = new Uint8Array(RLIMIT.size);
  check("getrlimit", libc.getrlimit(7, r));
  const v = new DataView(r.buffer);
  const line = Deno.readTextFileSync("/proc/self/limits").split("\n").find((l) =>
    l.startsWith("Max open files")
  );
  const [soft, hard] = line!.split(/\s{2,}/).slice(1, 3).map(Number);
  assert.equal(Number(v.getBigUint64(RLIMIT.cur, true)), soft);
  assert.equal(Number(v.getBigUint64(RLIMIT.max, true)), hard);
});
