import assert from "node:assert/strict";
import { ALLOC_MAP_MAX_BYTES, ALLOC_PAGE, AllocMap } from "./alloc_map.ts";

const P = ALLOC_PAGE;

/** A reference model: one boolean per page. */
function model(pages: number) {
  const a = new Array<boolean>(pages).fill(false);
  const span = (off: number, len: number) =>
    len === 0 ? [0, 0] : [Math.floor(off / P), Math.min(pages, Math.ceil((off + len) / P))];
  return {
    set(off: number, len: number, on: boolean) {
      const [f, e] = span(off, len);
      for (let p = f; p < e; p++) a[p] = on;
    },
    allocated(off: number, len: number) {
      const [f, e] = span(off, len);
      for (let p = f; p < e; p++) if (!a[p]) return false;
      return true;
    },
    unknown: () => a.filter((x) => !x).length,
  };
}

Deno.test("AllocMap from extents: reads inside data are allocated, reads touching a hole are not", () => {
  const m = AllocMap.fromExtents(1 << 20, [[0, 8 * P], [64 * P, 65 * P]]);
  assert.equal(m.unknownPages, 256 - 9);
  assert.equal(m.allocated(0, 8 * P), true);
  assert.equal(m.allocated(7 * P + 100, 100), true, "within one allocated page");
  assert.equal(m.allocated(7 * P, 2 * P), false, "crosses into the hole");
  assert.equal(m.allocated(64 * P, P), true);
  assert.equal(m.allocated(63 * P + 4095, 2), false);
  assert.equal(m.allocated(100 * P, 0), true, "an empty range");
});

Deno.test("AllocMap rounds writes out (a partial page allocates it) and discards out (maybe a hole)", () => {
  const m = new AllocMap(64 * P);
  m.markAllocated(P + 512, 512);
  assert.equal(m.allocated(P, P), true, "the whole page of a 512-byte write");
  assert.equal(m.unknownPages, 63);
  m.markAllocated(0, 64 * P);
  assert.equal(m.unknownPages, 0);
  assert.equal(m.allocated(5 * P, 3 * P), true);
  m.markUnknown(10 * P + 1, 1);
  assert.equal(m.allocated(10 * P, P), false, "a partial discard makes its page unknown");
  assert.equal(m.unknownPages, 1);
});

Deno.test("AllocMap matches a per-page model over random operations spanning word boundaries", () => {
  const pages = 1000;
  const m = new AllocMap(pages * P - 100); // the last page is partial
  const ref = model(pages);
  let seed = 12345;
  const rnd = (n: number) => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return seed % n;
  };
  for (let i = 0; i < 5000; i++) {
    const off = rnd(pages * P - 100);
    const len = Math.min(rnd(i % 10 === 0 ? 200 * P : 3 * P), pages * P - 100 - off);
    const op = rnd(3);
    if (op === 0) {
      m.markAllocated(off, len);
      ref.set(off, len, true);
    } else if (op === 1) {
      m.markUnknown(off, len);
      ref.set(off, len, false);
    } else {
      assert.equal(m.allocated(off, len), ref.allocated(off, len), `allocated(${off}, ${len}) at step ${i}`);
    }
    assert.equal(m.unknownPages, ref.unknown(), `unknown count at step ${i}`);
  }
});

Deno.test("AllocMap refuses sizes past its limit and bad ranges", () => {
  assert.throws(() => new AllocMap(ALLOC_MAP_MAX_BYTES + 1), RangeError);
  assert.throws(() => new AllocMap(-1), RangeError);
  const m = new AllocMap(16 * P);
  assert.throws(() => m.allocated(-1, 10), RangeError);
  assert.throws(() => m.markAllocated(0, 1.5), RangeError);
  m.markAllocated(15 * P, 100 * P); // clamped to the file
  assert.equal(m.unknownPages, 15);
});

Deno.test("alloc map shared between two instances: marks made through one are seen through the other", () => {
  const a = AllocMap.fromExtents(1 << 20, [[0, 8192]]);
  const b = new AllocMap(1 << 20, a.shared);
  assert.equal(b.allocated(0, 8192), true, "the seed is shared");
  assert.equal(b.unknownPages, 254);
  b.markAllocated(65536, 4096);
  a.markUnknown(0, 4096);
  assert.equal(a.allocated(65536, 4096), true);
  assert.equal(b.allocated(0, 4096), false);
  assert.equal(a.unknownPages, 254);
  assert.throws(() => new AllocMap(2 << 20, a.shared), /shared allocation map of \d+ bytes/);
});
