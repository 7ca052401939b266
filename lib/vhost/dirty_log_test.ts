import assert from "node:assert/strict";
import { ftruncate, mapShared, memfdCreate } from "../../ffi/mod.ts";
import { DirtyLog, LOG_PAGE } from "./dirty_log.ts";

/** A log of `bytes` bytes at `offset` in a fresh memfd; returns it and its set page numbers. */
function withLog(bytes: number, offset: number, fn: (log: DirtyLog, pages: () => number[]) => void): void {
  using fd = memfdCreate("dirty-log-test");
  ftruncate(fd, offset + bytes);
  const log = new DirtyLog(mapShared(fd, offset + bytes), offset, bytes);
  const pages = () => {
    const out: number[] = [];
    log.bits.forEach((b, i) => {
      for (let k = 0; k < 8; k++) if (b & (1 << k)) out.push(i * 8 + k);
    });
    return out;
  };
  try {
    fn(log, pages);
  } finally {
    log.close();
  }
}

Deno.test("dirty log marks exactly the pages a byte range touches", () => {
  withLog(64, 0, (log, pages) => {
    log.mark(0, 1);
    log.mark(LOG_PAGE - 1, 2); // straddles pages 0 and 1
    log.mark(7 * LOG_PAGE, LOG_PAGE); // exactly page 7
    log.mark(30 * LOG_PAGE + 5, 0); // nothing
    assert.deepEqual(pages(), [0, 1, 7]);
    log.mark(9 * LOG_PAGE + 100, 20 * LOG_PAGE); // pages 9..29: partial bytes at both ends, whole ones between
    assert.deepEqual(pages(), [0, 1, 7, ...Array.from({ length: 21 }, (_, i) => 9 + i)]);
  });
});

Deno.test("dirty log addresses pages above 4 GiB and 4 Gi pages exactly (no 32-bit truncation)", () => {
  // 1 MiB of log covers 8 Mi pages = 32 GiB of guest.
  withLog(1 << 20, 0, (log, pages) => {
    const gpa = 5 * 2 ** 30 + 3 * LOG_PAGE; // 5 GiB + 3 pages
    log.mark(gpa, 2 * LOG_PAGE);
    const first = gpa / LOG_PAGE;
    assert.deepEqual(pages(), [first, first + 1]);
    assert.equal(log.bits[Math.floor(first / 8)] & (1 << (first % 8)), 1 << (first % 8));
    // Nothing 4 GiB lower (what a `>>> 0` of the address would hit).
    assert.equal(log.bits[Math.floor((first - 2 ** 20) / 8)], 0);
  });
});

Deno.test("dirty log at an offset in its fd, and writes beyond it counted, not marked", () => {
  withLog(2, 100, (log, pages) => {
    assert.equal(log.pages, 16);
    log.mark(14 * LOG_PAGE, 4 * LOG_PAGE); // pages 14..17: 16 and 17 are beyond
    assert.deepEqual(pages(), [14, 15]);
    assert.equal(log.beyond, 2);
    log.mark(100 * LOG_PAGE, 1);
    assert.equal(log.beyond, 3);
  });
});

Deno.test("dirty log refuses a log outside its mapping", () => {
  using fd = memfdCreate("dirty-log-test");
  ftruncate(fd, 4096);
  const map = mapShared(fd, 4096);
  try {
    assert.throws(
      () => new DirtyLog(map, 4000, 200),
      /dirty log of 200 bytes at offset 4000 beyond its 4096-byte mapping/,
    );
  } finally {
    map.close();
  }
});
