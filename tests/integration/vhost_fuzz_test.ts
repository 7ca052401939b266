/**
 * A bounded slice of `deno task fuzz vhost` (fuzz/vhost/runner.ts) against real `mpq vhost blk`
 * and `mpq vhost rng` daemons: a fixed seed, and a random one printed so a failure can be
 * replayed (VHOST_FUZZ_SEED sets it; `deno task fuzz vhost --seed S --case N` replays one case).
 * Every case mixes mutated and random messages, wrong fds, memory tables changed under running
 * queues and corrupted rings; after each one the daemon must be alive, answer a probe, hold no
 * more fds or shared mappings than after its first clean session, and it must keep serving
 * verified I/O to a well-behaved front-end. The minimized reproductions of what the fuzzer found
 * (fuzz/vhost/corpus, written by `deno task fuzz vhost --minimize`) must all pass.
 */
import assert from "node:assert/strict";
import { distinctFailures, formatFailure, formatFigures, runVhostFuzz } from "../../fuzz/vhost/runner.ts";
import { CASE_KINDS, planFromJson } from "../../fuzz/vhost/steps.ts";

const FIXED_SEED = 20250601;
const RANDOM_SEED = Number(Deno.env.get("VHOST_FUZZ_SEED") ?? Math.floor(Math.random() * 2 ** 32));
/** Messages and ring states per seed (split between blk and rng). */
const MESSAGES = Number(Deno.env.get("VHOST_FUZZ_MESSAGES") ?? 5000);
const RINGS = Number(Deno.env.get("VHOST_FUZZ_RINGS") ?? 500);

async function slice(seed: number): Promise<void> {
  const lines: string[] = [];
  const r = await runVhostFuzz({
    devices: ["blk", "rng"],
    messages: MESSAGES,
    rings: RINGS,
    seed,
    kinds: CASE_KINDS,
    verifyEvery: 20,
    timeoutMs: 3000,
    stallMs: 2000,
    settleMs: 1000,
    blkArgs: [],
    replayArgs: [],
    maxReports: 3,
    printPlans: false,
    progressSeconds: 0,
    // A slice that keeps hitting hangs must still end in time for CI.
    maxSeconds: 20,
    out: (l) => lines.push(l),
  });
  console.log(formatFigures(r.figures, `vhost fuzz slice, seed ${seed}`));
  const distinct = distinctFailures(r.failures);
  const report = [
    `seed ${seed}: ${r.failures.length} failure(s), ${distinct.length} distinct${
      r.artefacts ? `; reports and daemon logs in ${r.artefacts}` : ""
    }`,
    ...distinct.slice(0, 3).flatMap((
      { first, count },
    ) => [`${count} x`, ...formatFailure(first).slice(0, 60)]),
  ].join("\n");
  assert.equal(r.error, null, `seed ${seed}: ${r.error}`);
  assert.equal(r.failures.length, 0, report);
  assert.equal(r.figures.timedOut, 0, `seed ${seed}: the slice did not finish within 20 s`);
  assert.ok(r.figures.messages >= MESSAGES, `seed ${seed}: only ${r.figures.messages} messages sent`);
  assert.ok(r.figures.ringStates >= RINGS, `seed ${seed}: only ${r.figures.ringStates} ring states tried`);
  assert.ok(r.figures.verifications >= 4, `seed ${seed}: only ${r.figures.verifications} verifications`);
}

Deno.test("vhost fuzz: every minimized reproduction in fuzz/vhost/corpus now passes", async () => {
  const dir = new URL("../../fuzz/vhost/corpus/", import.meta.url);
  const failed: string[] = [];
  const files = [...Deno.readDirSync(dir)].map((e) => e.name).filter((n) => n.endsWith(".json")).sort();
  for (const name of files) {
    const plan = planFromJson(Deno.readTextFileSync(new URL(name, dir)));
    const r = await runVhostFuzz({
      devices: [plan.device],
      messages: 0,
      rings: 0,
      seed: plan.seed,
      plan,
      planFile: `fuzz/vhost/corpus/${name}`,
      kinds: CASE_KINDS,
      verifyEvery: 0,
      timeoutMs: 3000,
      stallMs: 2000,
      settleMs: 1000,
      blkArgs: [],
      replayArgs: [],
      maxReports: 0,
      printPlans: false,
      progressSeconds: 0,
      artefacts: false,
      out: () => {},
    });
    if (r.error) failed.push(`${name}: ${r.error}`);
    for (const f of r.failures) failed.push(`${name}: ${f.kind}: ${f.summary}`);
  }
  assert.deepEqual(
    failed,
    [],
    "replay one with: deno task fuzz vhost --plan-file=fuzz/vhost/corpus/NAME.json",
  );
});

Deno.test(`vhost fuzz: a fixed-seed slice finds no crash, hang, stall, leak or failed I/O (seed ${FIXED_SEED})`, async () => {
  await slice(FIXED_SEED);
});

Deno.test(`vhost fuzz: a random-seed slice finds no crash, hang, stall, leak or failed I/O (seed ${RANDOM_SEED}; replay with VHOST_FUZZ_SEED=${RANDOM_SEED})`, async () => {
  await slice(RANDOM_SEED);
});
