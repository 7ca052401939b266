import assert from "node:assert/strict";
import { Mailbox, mailboxMemory, SLOT_BYTES, SLOTS } from "./mailbox.ts";

Deno.test("mailbox keeps order across many laps of its slots", () => {
  const memory = mailboxMemory();
  const w = new Mailbox(memory), r = new Mailbox(memory);
  let next = 0, sent = 0;
  while (sent < SLOTS * 5) {
    for (let i = 0; i < 7; i++) w.send({ n: sent++, payload: [1, 2, 3] });
    for (let m = r.peek() as { n: number } | undefined; m; m = r.peek() as { n: number } | undefined) {
      assert.equal(m.n, next++);
      r.take();
    }
  }
  assert.equal(next, sent);
  assert.ok(sent >= SLOTS * 5);
});

Deno.test("mailbox refuses a message too big for a slot and a send to a full mailbox", () => {
  const memory = mailboxMemory();
  const w = new Mailbox(memory), r = new Mailbox(memory);
  assert.throws(() => w.send({ big: "x".repeat(SLOT_BYTES) }), /mailbox message of \d+ bytes/);
  for (let i = 0; i < SLOTS; i++) w.send(i);
  assert.throws(() => w.send(SLOTS), /mailbox full \(64 messages unread\)/);
  r.take();
  w.send(SLOTS); // a slot was freed
  assert.equal(r.peek(), 1);
});

Deno.test("mailbox refuses memory of the wrong size", () => {
  assert.throws(() => new Mailbox(new SharedArrayBuffer(64)), /mailbox memory of 64 bytes/);
});
