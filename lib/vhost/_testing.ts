/**
 * Test helpers private to lib/vhost: guest RAM in a memfd and a driver-side split ring writer.
 * (The full front-end driver lives in tests/helpers/vhost_frontend.ts.)
 * @module
 */
import { ftruncate, type MappedRegion, mapShared, memfdCreate, type OwnedFd } from "../../ffi/mod.ts";
import type { MemoryRegion } from "./message.ts";

/** A fake front-end virtual base address for the guest RAM region. */
export const USER_BASE = 0x7f00_0000_0000n;

/** Guest RAM: one memfd region at guest-physical 0, mapped here for the "driver" side. */
export class TestGuest {
  readonly fd: OwnedFd;
  readonly map: MappedRegion;
  readonly size: number;
  readonly view: DataView;
  readonly bytes: Uint8Array<ArrayBuffer>;

  constructor(size = 1 << 20) {
    this.size = size;
    this.fd = memfdCreate("test-guest");
    ftruncate(this.fd, size);
    this.map = mapShared(this.fd, size);
    this.bytes = this.map.bytes;
    this.view = new DataView(this.bytes.buffer);
  }

  /** The region as SET_MEM_TABLE describes it. */
  get region(): MemoryRegion {
    return { guestAddr: 0n, size: BigInt(this.size), userAddr: USER_BASE, mmapOffset: 0n };
  }

  close(): void {
    this.map.close();
    this.fd.close();
  }
}

/** Driver side of one split ring inside a TestGuest. */
export class TestRing {
  readonly guest: TestGuest;
  readonly size: number;
  readonly desc: number;
  readonly avail: number;
  readonly used: number;
  availIdx = 0;
  lastUsed = 0;

  constructor(guest: TestGuest, size: number, base = 0x1000) {
    this.guest = guest;
    this.size = size;
    this.desc = base;
    this.avail = base + 16 * size;
    this.used = Math.ceil((this.avail + 6 + 2 * size) / 4096) * 4096;
  }

  /** Ring addresses as the front-end sends them (virtual). */
  get userAddrs(): { desc: bigint; avail: bigint; used: bigint } {
    return {
      desc: USER_BASE + BigInt(this.desc),
      avail: USER_BASE + BigInt(this.avail),
      used: USER_BASE + BigInt(this.used),
    };
  }

  /** Writes descriptor `i` of the table at guest-physical `table` (default: the ring's table). */
  setDesc(i: number, addr: number | bigint, len: number, flags: number, next = 0, table = this.desc): void {
    const v = this.guest.view;
    const o = table + 16 * i;
    v.setBigUint64(o, BigInt(addr), true);
    v.setUint32(o + 8, len, true);
    v.setUint16(o + 12, flags, true);
    v.setUint16(o + 14, next, true);
  }

  /** Makes `head` available and bumps avail->idx. */
  publish(head: number): void {
    const v = this.guest.view;
    v.setUint16(this.avail + 4 + 2 * (this.availIdx % this.size), head, true);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    v.setUint16(this.avail + 2, this.availIdx, true);
  }

  /** Sets avail->flags. */
  setAvailFlags(flags: number): void {
    this.guest.view.setUint16(this.avail, flags, true);
  }

  /** Sets used_event (avail->ring[size]). */
  setUsedEvent(v: number): void {
    this.guest.view.setUint16(this.avail + 4 + 2 * this.size, v, true);
  }

  /** avail_event (used->ring[size]). */
  get availEvent(): number {
    return this.guest.view.getUint16(this.used + 4 + 8 * this.size, true);
  }

  /** used->idx. */
  get usedIdx(): number {
    return this.guest.view.getUint16(this.used + 2, true);
  }

  /** Used element `i` (modulo size). */
  usedElem(i: number): { id: number; len: number } {
    const o = this.used + 4 + 8 * (i % this.size);
    return { id: this.guest.view.getUint32(o, true), len: this.guest.view.getUint32(o + 4, true) };
  }
}
