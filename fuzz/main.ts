/**
 * `deno task fuzz NAME [options]`: runs one fuzzer. `deno task fuzz --list` names them.
 * @module
 */

/** One fuzzer: loaded only when it runs. Adding a fuzzer is one line here. */
export const FUZZERS: ReadonlyArray<
  { name: string; summary: string; run: (args: string[]) => Promise<number> }
> = [
  {
    name: "vhost",
    summary: "mpq vhost blk|rng daemons: messages, fds, memory tables and rings from a hostile front-end",
    run: (args) => import("./vhost.ts").then((m) => m.fuzzVhost(args)),
  },
];

const USAGE = `Usage: deno task fuzz NAME [options]   (deno task fuzz NAME --help for its options)
       deno task fuzz --list
Fuzzers: ${FUZZERS.map((f) => f.name).join(", ")}`;

async function main(args: string[]): Promise<number> {
  const [name, ...rest] = args;
  if (name === undefined || name === "-h" || name === "--help") {
    console.log(USAGE);
    return name === undefined ? 2 : 0;
  }
  if (name === "--list") {
    for (const f of FUZZERS) console.log(`${f.name.padEnd(10)} ${f.summary}`);
    return 0;
  }
  const f = FUZZERS.find((x) => x.name === name);
  if (!f) {
    console.error(
      `fuzz: unknown fuzzer ${JSON.stringify(name)}: expected one of ${
        FUZZERS.map((x) => x.name).join(", ")
      }`,
    );
    return 2;
  }
  return await f.run(rest);
}

if (import.meta.main) Deno.exit(await main(Deno.args));
