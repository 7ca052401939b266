/**
 * Option values shared by the subcommands' argument parsing.
 * @module
 */
import { UsageError } from "./errors.ts";

/**
 * An integer option `--name` in [min, max] (undefined when not given); anything else is a
 * UsageError naming the option, the value and the range, followed by `usage`.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * assert.equal(intOption("num-queues", "4", { min: 1, max: 64, usage: "" }), 4);
 * assert.throws(() => intOption("num-queues", "0", { min: 1, max: 64, usage: "" }), /--num-queues must be an integer in 1\.\.64: got "0"/);
 * ```
 */
export function intOption(
  name: string,
  value: string | undefined,
  options: { min: number; max: number; usage: string },
): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  const { min, max } = options;
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n) || n < min || n > max) {
    throw new UsageError(
      `--${name} must be an integer in ${min}..${max}: got ${JSON.stringify(value)}`,
      options.usage,
    );
  }
  return n;
}
