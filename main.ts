/**
 * mpq: host-side plumbing for disaggregated QEMU devices. Subcommand dispatch only.
 * @module
 */
import { InputError, UsageError } from "./lib/cli/errors.ts";
import { VERSION } from "./lib/version.ts";
import { DEVICE_THREAD_NAME, QUEUE_THREAD_NAME } from "./lib/vhost/thread_name.ts";

type Command = { summary: string; main: (args: string[]) => Promise<number> };

/**
 * Subcommands; each module's main returns the exit code. Modules load on first use, so a command
 * pays start-up only for its own code (a supervised child such as `mpq vhost` starts faster).
 */
const COMMANDS: Record<string, Command> = {
  orchestrate: {
    summary: "multi-process QEMU from a JSON topology",
    main: async (a) => (await import("./lib/orchestrate/cli.ts")).main(a),
  },
  ctl: {
    summary: "control a running mpq orchestrate (status, live migration)",
    main: async (a) => (await import("./lib/orchestrate/ctl_cli.ts")).ctlMain(a),
  },
  qmp: {
    summary: "run one QMP command on a QEMU monitor socket",
    main: async (a) => (await import("./lib/orchestrate/cli.ts")).qmpMain(a),
  },
  ivshmem: {
    summary: "ivshmem server (drop-in for contrib ivshmem-server) and client",
    main: async (a) => (await import("./lib/ivshmem/mod.ts")).main(a),
  },
  vhost: {
    summary: "vhost-user back-end daemons (blk, rng)",
    main: async (a) => (await import("./lib/vhost/cli.ts")).main(a),
  },
};

const USAGE = `mpq ${VERSION}: host-side plumbing for disaggregated QEMU devices

Usage: mpq <command> [options]

Commands:
${Object.entries(COMMANDS).map(([n, c]) => `  ${n.padEnd(12)} ${c.summary}`).join("\n")}

  mpq <command> --help   options of one command
  mpq --version          print the version
`;

async function main(args: string[]): Promise<number> {
  const [cmd, ...rest] = args;
  if (cmd === undefined || cmd === "-h" || cmd === "--help" || cmd === "help") {
    console.log(USAGE);
    return cmd === undefined ? 1 : 0;
  }
  if (cmd === "--version" || cmd === "-V") {
    console.log(`mpq ${VERSION}`);
    return 0;
  }
  const command = COMMANDS[cmd];
  if (!command) {
    console.error(`mpq: unknown command '${cmd}'\n`);
    console.error(USAGE);
    return 1;
  }
  try {
    return await command.main(rest);
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(`mpq ${cmd}: ${e.message}`);
      if (e.usage) console.error(`\n${e.usage}`);
      return 1;
    }
    // Loaded here, not at start: `mpq --version` and `--help` load no FFI (libc) at all.
    const { ErrnoError } = await import("./ffi/errno.ts");
    if (e instanceof InputError || e instanceof ErrnoError) {
      console.error(`mpq ${cmd}: ${e.message}`);
      return 1;
    }
    throw e;
  }
}

if ((globalThis as { name?: string }).name === DEVICE_THREAD_NAME) {
  // This program started as a `mpq vhost serve` device thread (a Worker on this same module).
  await (await import("./lib/vhost/device_thread.ts")).threadMain();
} else if ((globalThis as { name?: string }).name === QUEUE_THREAD_NAME) {
  // A queue thread: some queues of a multi-queue device (see lib/vhost/queue_thread.ts).
  await (await import("./lib/vhost/queue_thread.ts")).queueThreadMain();
} else if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
