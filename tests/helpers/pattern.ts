/**
 * Deterministic test data.
 * @module
 */

/**
 * `n` pseudo-random bytes from a xorshift32 seeded with `seed` (the same seed gives the same bytes).
 * @example
 * const data = pattern(4096, 7);
 */
export function pattern(n: number, seed: number): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/**
 * Asserts two byte arrays are equal, naming the first differing offset. (node:assert's deepEqual
 * diffs whole arrays: on 64 KiB of mismatching data its message takes minutes and gigabytes.)
 * @example
 * assertSameBytes(readBack, written, "sector 8");
 */
export function assertSameBytes(actual: Uint8Array, expected: Uint8Array, what = "bytes"): void {
  if (actual.byteLength !== expected.byteLength) {
    throw new Error(`${what}: ${actual.byteLength} bytes, expected ${expected.byteLength}`);
  }
  for (let i = 0; i < actual.byteLength; i++) {
    if (actual[i] !== expected[i]) {
      throw new Error(
        `${what}: byte ${i} of ${actual.byteLength} is 0x${actual[i].toString(16)}, expected 0x${
          expected[i].toString(16)
        }`,
      );
    }
  }
}
