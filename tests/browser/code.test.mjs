// The console's checksum code (gateway/console/code.js) against the same vectors and error
// cases as the Rust original (services/cardcrypto/tests/vectors.rs and negative.rs).
// Run: node --test tests/browser/code.test.mjs

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

import {
  checksum,
  formatGroups,
  liveStatus,
  parseHex,
  parseWithChecksum,
} from "../../gateway/console/code.js";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const data = join(root, "services", "cardcrypto", "tests", "data");

const hex = (s) => Uint8Array.from(s.match(/../g), (b) => parseInt(b, 16));
const toHex = (bytes) => Array.from(bytes, (b) => b.toString(16).toUpperCase().padStart(2, "0")).join("");

// The "Checksums of typed codes" table of the vectors README: | value | checksum |.
function checksumRows() {
  const text = readFileSync(join(data, "README.md"), "utf8");
  const section = text.split("\n## ").find((s) => s.startsWith("Checksums"));
  assert.ok(section, "Checksums section");
  const rows = section
    .split("\n")
    .filter((l) => /^\| [0-9A-F]+ \| [0-9A-F]{4} \|$/.test(l))
    .map((l) => l.split("|").map((c) => c.trim()).filter(Boolean));
  const catalogue = section.match(/over ASCII "([^"]+)": ([0-9A-F]{4})/);
  return { rows, catalogue };
}

const vectors = JSON.parse(readFileSync(join(data, "diversification.json"), "utf8"));

function codeError(fn) {
  try {
    fn();
  } catch (e) {
    return e;
  }
  assert.fail("expected a CodeError");
}

test("checksum table and catalogue check", () => {
  const { rows, catalogue } = checksumRows();
  assert.equal(rows.length, 5);
  for (const [value, sum] of rows) {
    const bytes = hex(value);
    assert.equal(checksum(bytes), sum, value);
    const typed = formatGroups(bytes).toLowerCase().replaceAll(" ", "-");
    assert.equal(toHex(parseWithChecksum(typed, sum.toLowerCase(), [8, 16])), value);
  }
  assert.equal(checksum(new TextEncoder().encode(catalogue[1])), catalogue[2]);
});

test("design example groups", () => {
  assert.equal(formatGroups(hex("1603EBDF1C8A2E72")), "1603 EBDF 1C8A 2E72");
  assert.equal(checksum(hex("1603EBDF1C8A2E72")), "9D70");
});

test("every diversification vector's challenge and response checksums", () => {
  assert.ok(vectors.length > 0);
  for (const v of vectors) {
    assert.equal(checksum(hex(v.challenge)), v.challenge_checksum, v.scheme);
    assert.equal(checksum(hex(v.response)), v.response_checksum, v.scheme);
  }
});

test("every single-digit checksum change and a code typo are caught, revealing nothing", () => {
  for (const v of vectors) {
    const right = v.response_checksum;
    for (let i = 0; i < 4; i++) {
      for (const d of "0123456789ABCDEF") {
        if (right[i] === d) continue;
        const typed = right.slice(0, i) + d + right.slice(i + 1);
        const err = codeError(() => parseWithChecksum(v.response, typed, [8, 16]));
        assert.equal(err.kind, "ChecksumMismatch");
        assert.equal(err.message, "the checksum does not match the code; check both for a typing error");
        assert.ok(!err.message.includes(right) && !err.message.includes(typed));
      }
    }
    const code = [...v.response];
    code[3] = code[3] === "0" ? "1" : "0";
    assert.equal(codeError(() => parseWithChecksum(code.join(""), right, [8, 16])).kind, "ChecksumMismatch");
  }
});

test("malformed and missing checksums", () => {
  const resp = "9CB2DC8314AFA496";
  for (const bad of ["9D700", "9D7G", "9D7\u00D8"]) {
    const err = codeError(() => parseWithChecksum(resp, bad, [8]));
    assert.equal(err.kind, "ChecksumMalformed", bad);
    assert.equal(err.message, "the checksum must be exactly 4 hex digits (0-9, A-F)");
  }
  for (const [bad, got] of [["", 0], ["  ", 0], ["9D7", 3], ["9-D", 2]]) {
    const err = codeError(() => parseWithChecksum(resp, bad, [8]));
    assert.equal(err.kind, "ChecksumMissing", bad);
    assert.equal(err.gotDigits, got);
    assert.equal(
      err.message,
      `the checksum is missing: it is the 4 hex digits shown beside the code, ${got} were given`,
    );
  }
});

test("lengths, odd digits, empty input and non-hex characters", () => {
  const resp = "9CB2DC8314AFA496";
  assert.equal(codeError(() => parseHex(resp.slice(0, 15), [8])).message, "the code has 15 hex digits, expected 16");
  assert.equal(codeError(() => parseHex(`${resp}${resp}00`, [8, 16])).message, "the code has 34 hex digits, expected 16 or 32");
  const odd = codeError(() => parseHex(resp.slice(0, 15), []));
  assert.equal(odd.kind, "OddDigits");
  assert.equal(odd.message, "the code has an odd number of hex digits (15)");
  for (const empty of ["", "   ", "- -", "\t"]) {
    assert.equal(codeError(() => parseHex(empty, [8])).kind, "Empty");
    assert.equal(codeError(() => parseWithChecksum(empty, "9D70", [8])).message, "no code was entered");
  }
  const cases = [
    ["1603 EBDG", "character 9 is not a hex digit (it is a letter other than A-F)"],
    ["16.3", "character 3 is not a hex digit (it is a punctuation mark)"],
    ["16\u00003", "character 3 is not a hex digit (it is a control character)"],
    ["16\u20133", "character 3 is not a hex digit (it is a non-ASCII character)"],
    ["\u{1F600}1", "character 1 is not a hex digit (it is a non-ASCII character)"],
  ];
  for (const [input, message] of cases) {
    const err = codeError(() => parseHex(input, [8]));
    assert.equal(err.kind, "NotHex");
    assert.equal(err.message, message);
  }
  // Unicode whitespace is skipped like Rust's char::is_whitespace, the dash too.
  assert.equal(toHex(parseHex("1603\u00a0EBDF\u30001C8A-2E72\u0085", [8])), "1603EBDF1C8A2E72");
});

test("live status while typing", () => {
  assert.equal(liveStatus("", "", [8]).state, "incomplete");
  assert.deepEqual(liveStatus("1603 EBDF", "", [8]), { state: "incomplete", message: "8 of 16 hex digits typed." });
  assert.equal(liveStatus("1603 EBDF 1C8A 2E72", "", [8]).state, "incomplete");
  assert.equal(liveStatus("1603 EBDF 1C8A 2E72", "9D", [8]).state, "incomplete");
  assert.equal(liveStatus("1603 EBDF 1C8A 2E72", "9D70", [8]).state, "ok");
  const wrong = liveStatus("1603 EBDF 1C8A 2E72", "9D71", [8]);
  assert.equal(wrong.state, "error");
  assert.ok(!wrong.message.includes("9D70"));
  assert.equal(liveStatus("1603 EBDX", "", [8]).state, "error");
  assert.equal(liveStatus("1603 EBDF 1C8A 2E72 00", "", [8]).state, "error");
  assert.equal(liveStatus("1603 EBDF 1C8A 2E72", "9D7G", [8]).state, "error");
  // An AES card: 16 digits is not done yet.
  assert.equal(liveStatus("1603 EBDF 1C8A 2E72", "9D70", [16]).state, "incomplete");
});
