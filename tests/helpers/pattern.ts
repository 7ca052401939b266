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
