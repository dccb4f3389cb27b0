// The helpdesk console: a small hash-routed app over the gateway's JSON API (/api/v1). Pages
// are <template>s in index.html; data goes in with textContent only (never as HTML), so
// nothing a directory or a caller holds can inject markup. No inline code: the CSP forbids it.

import { liveStatus } from "/code.js";

const view = document.getElementById("view");
const announce = document.getElementById("announce");

class ApiError extends Error {}

async function api(method, path, body) {
  const init = { method, headers: { Accept: "application/json" }, cache: "no-store", credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(`/api/v1${path}`, init);
  } catch {
    throw new ApiError("The gateway cannot be reached. Check the network and try again.");
  }
  let json = null;
  try {
    json = await response.json();
  } catch {
    json = null;
  }
  if (!response.ok) {
    throw new ApiError(json?.error?.message || `The gateway answered ${response.status}.`);
  }
  return json;
}

const enc = encodeURIComponent;
const humanise = (name) => (name ? name.replaceAll("-", " ") : "");
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function field(root, name) {
  return root.querySelector(`[data-field="${name}"]`);
}

function show(templateId) {
  const fragment = document.getElementById(templateId).content.cloneNode(true);
  view.replaceChildren(fragment);
  const h1 = view.querySelector("h1");
  document.title = `${h1.textContent} · CMS helpdesk console`;
  return view;
}

function focusHeading() {
  view.querySelector("h1")?.focus();
}

function showError(root, error) {
  const box = field(root, "error");
  box.textContent = error instanceof ApiError ? error.message : `Unexpected error: ${error.message}`;
}

function clearError(root) {
  field(root, "error").textContent = "";
}

let me = null;

async function loadMe() {
  try {
    me = await api("GET", "/whoami");
  } catch (e) {
    document.getElementById("signed-in").textContent = e.message;
    return;
  }
  const op = me.operator;
  document.getElementById("signed-in").textContent = op ? `Signed in as ${op.display_name || op.username}` : "";
  const roles = op?.roles ?? [];
  document.getElementById("nav-audit").hidden = !roles.some((r) => r === "auditor" || r === "admin");
}

// ---- pages ----

async function whoAmIPage() {
  const root = show("t-whoami");
  focusHeading();
  if (!me) await loadMe();
  if (!me) return;
  const op = me.operator ?? {};
  field(root, "display_name").textContent = op.display_name || "";
  field(root, "username").textContent = op.username || "";
  field(root, "roles").textContent = (op.roles ?? []).join(", ") || "none";
  field(root, "org_units").textContent = (op.org_units ?? []).join(", ") || "all";
  field(root, "template_ids").textContent = (op.template_ids ?? []).join(", ") || "all";
  field(root, "peer_identity").textContent = me.peer_identity;
  field(root, "allowed_services").textContent = (me.allowed_services ?? []).join(", ");
}

function searchPage(params) {
  const root = show("t-search");
  const form = root.querySelector("#search-form");
  const input = root.querySelector("#search-query");
  const table = root.querySelector("table");
  const tbody = root.querySelector("tbody");
  const empty = field(root, "empty");
  const run = async (query) => {
    clearError(root);
    try {
      const found = await api("GET", `/users?query=${enc(query)}&page_size=50`);
      tbody.replaceChildren();
      for (const hit of found.results) {
        const u = hit.user ?? {};
        const row = el("tr");
        const nameCell = el("td");
        nameCell.append(el("a", u.display_name || u.username, { href: `#/user/${enc(u.id)}` }));
        row.append(nameCell, el("td", u.username), el("td", u.email), el("td", u.org_unit), el("td", u.status), el("td", hit.credential_count));
        tbody.append(row);
      }
      table.hidden = found.results.length === 0;
      empty.hidden = found.results.length !== 0;
      announce.textContent = `${found.results.length} users found.`;
    } catch (e) {
      showError(root, e);
    }
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = `#/search?q=${enc(input.value.trim())}`;
  });
  const q = params.get("q");
  if (q) {
    input.value = q;
    run(q);
  }
  input.focus();
}

function actionLink(text, href) {
  return el("a", text, { href });
}

async function userPage(userId) {
  const root = show("t-user");
  focusHeading();
  let data;
  try {
    data = await api("GET", `/users/${enc(userId)}?include_inactive=true`);
  } catch (e) {
    showError(root, e);
    return;
  }
  const u = data.user ?? {};
  field(root, "title").textContent = u.display_name || u.username;
  document.title = `${u.display_name || u.username} · CMS helpdesk console`;
  for (const name of ["username", "email", "phone", "org_unit", "status"]) field(root, name).textContent = u[name] || "";
  const tbody = root.querySelector("tbody");
  for (const card of data.cards) {
    const c = card.credential ?? {};
    const row = el("tr");
    const actions = el("div", null, { class: "actions" });
    const allowed = new Set(card.allowed_actions);
    if (allowed.has("offline-response")) {
      actions.append(actionLink("Unblock the PIN (offline)", `#/unblock/${enc(userId)}/${enc(c.id)}`));
    }
    if (allowed.has("read-piv-puk")) {
      const btn = el("button", "Read the PUK", { type: "button", class: "secondary" });
      btn.addEventListener("click", () => readPuk(root, userId, c.id));
      actions.append(btn);
    }
    if (allowed.has("issue-one-time-code")) {
      const btn = el("button", "Issue a one-time code", { type: "button", class: "secondary" });
      btn.addEventListener("click", () => oneTimeCode(root, userId, c.id));
      actions.append(btn);
    }
    if (allowed.has("update-status") && c.status === "active") {
      const btn = el("button", "Report the card lost", { type: "button", class: "secondary" });
      btn.addEventListener("click", () => markLost(root, userId, c.id));
      actions.append(btn);
    }
    for (const note of card.restrictions) actions.append(el("span", note, { class: "hint" }));
    const actionCell = el("td");
    actionCell.append(actions);
    row.append(el("td", c.serial || c.id), el("td", c.profile), el("td", c.status), el("td", card.template_name), actionCell);
    tbody.append(row);
  }
}

async function readPuk(root, userId, credentialId) {
  clearError(root);
  try {
    const r = await api("POST", `/users/${enc(userId)}/cards/${enc(credentialId)}/piv-puk`, {});
    const panel = field(root, "otc");
    panel.hidden = false;
    panel.querySelector("h2").textContent = "PUK";
    field(root, "otc-code").textContent = r.puk_code ? `${r.puk}  (hex ${r.puk_code.groups}, checksum ${r.puk_code.checksum})` : r.puk;
    field(root, "otc-expires").textContent = "at the card's next online contact (it is now exposed and will be rotated)";
    panel.querySelector("h2").focus();
  } catch (e) {
    showError(root, e);
  }
}

async function oneTimeCode(root, userId, credentialId) {
  clearError(root);
  try {
    const r = await api("POST", `/users/${enc(userId)}/one-time-code`, { credential_id: credentialId });
    const panel = field(root, "otc");
    panel.hidden = false;
    field(root, "otc-code").textContent = r.code;
    field(root, "otc-expires").textContent = when(r.expires_at);
    panel.querySelector("h2").focus();
  } catch (e) {
    showError(root, e);
  }
}

async function markLost(root, userId, credentialId) {
  clearError(root);
  try {
    await api("POST", `/cards/${enc(credentialId)}/status`, { status: "lost", reason: "reported by the user to the helpdesk" });
    announce.textContent = "The card is now marked lost.";
    await userPage(userId);
  } catch (e) {
    showError(root, e);
  }
}

async function unblockPage(userId, credentialId) {
  const root = show("t-unblock");
  focusHeading();
  let data;
  try {
    data = await api("GET", `/users/${enc(userId)}`);
  } catch (e) {
    showError(root, e);
    return;
  }
  const card = data.cards.find((c) => c.credential?.id === credentialId);
  const u = data.user ?? {};
  if (!card) {
    showError(root, new ApiError("This card does not belong to this user."));
    return;
  }
  if (!card.allowed_actions.includes("offline-response")) {
    // The gateway decides; this only warns before the user reads a challenge out for nothing.
    const offline = card.restrictions.filter((r) => /offline/i.test(r));
    const notes = offline.length ? offline : card.restrictions;
    const why = notes.length ? notes.join("; ") : "your roles or scope do not allow it";
    showError(root, new ApiError(`You may not unblock this card offline: ${why}.`));
  }
  const lengths = card.challenge_length ? [card.challenge_length] : [8, 16];
  field(root, "subtitle").textContent = `${u.display_name || u.username} · card ${card.credential.serial || credentialId} · template ${card.template_name}`;
  field(root, "challenge-hint").textContent = `${lengths.map((n) => n * 2).join(" or ")} hex digits as the user reads them; spaces and dashes are ignored.`;

  const form = root.querySelector("#unblock-form");
  const challenge = root.querySelector("#challenge");
  const checksum = root.querySelector("#checksum");
  const checksumField = field(root, "checksum-field");
  const status = root.querySelector("#challenge-status");
  const flow = () => form.querySelector('input[name="flow"]:checked').value;
  let approvalId = "";

  const update = () => {
    const windows = flow() === "windows-unblock-screen";
    checksumField.hidden = windows;
    let s;
    if (windows) {
      const digits = challenge.value.replace(/[\s-]/g, "").length;
      s = digits === 0 ? { state: "incomplete", message: "" } : { state: "incomplete", message: `${digits} hex digits typed.` };
    } else {
      s = liveStatus(challenge.value, checksum.value, lengths);
    }
    status.textContent = s.message;
    status.className = `live ${s.state}`;
    const bad = s.state === "error";
    challenge.setAttribute("aria-invalid", String(bad));
    checksum.setAttribute("aria-invalid", String(bad));
    return s;
  };
  challenge.addEventListener("input", update);
  checksum.addEventListener("input", update);
  form.addEventListener("change", update);
  update();

  // Dual control: ask for approval first, then use it.
  const needsApproval = card.approval_required_actions.includes("offline-response");
  const approvalPanel = field(root, "approval");
  const approvalState = field(root, "approval-state");
  const checkButton = root.querySelector("#approval-check");
  const checkApproval = async () => {
    try {
      const r = await api("GET", `/approvals/${enc(approvalId)}`);
      const a = r.approval;
      if (a.state === "approved") {
        approvalState.textContent = `Approved by ${a.decided_by_name || "an approver"}. You can compute the response now.`;
        checkButton.hidden = true;
        return true;
      }
      approvalState.textContent = `The approval is ${humanise(a.state)}.`;
    } catch (e) {
      showError(root, e);
    }
    return false;
  };
  if (needsApproval) {
    approvalPanel.hidden = false;
    root.querySelector("#approval-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      clearError(root);
      try {
        const r = await api("POST", "/approvals", {
          action: "offline-response",
          user_id: userId,
          credential_id: credentialId,
          reason: root.querySelector("#approval-reason").value,
          ticket_reference: root.querySelector("#ticket").value,
        });
        approvalId = r.approval.id;
        approvalState.textContent = "Approval requested. Ask an approver to open Approvals in their console.";
        checkButton.hidden = false;
      } catch (e) {
        showError(root, e);
      }
    });
    checkButton.addEventListener("click", checkApproval);
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError(root);
    const s = update();
    const windows = flow() === "windows-unblock-screen";
    if (!windows && s.state !== "ok") {
      showError(root, new ApiError(s.state === "error" ? s.message : `Not complete yet: ${s.message}`));
      challenge.focus();
      return;
    }
    if (needsApproval && !approvalId) {
      showError(root, new ApiError("Request the approval of a second operator first."));
      root.querySelector("#approval-reason").focus();
      return;
    }
    // A new try replaces the last answer: never leave an old response beside a new error.
    field(root, "result").hidden = true;
    try {
      const r = await api("POST", `/users/${enc(userId)}/cards/${enc(credentialId)}/offline-response`, {
        challenge: challenge.value,
        checksum: windows ? "" : checksum.value,
        flow: flow(),
        approval_id: approvalId,
        ticket_reference: root.querySelector("#ticket").value,
      });
      field(root, "response").textContent = r.response.groups;
      field(root, "response-checksum").textContent = r.response.checksum;
      field(root, "request-id").textContent = r.request_id;
      field(root, "copied").textContent = "";
      const result = field(root, "result");
      result.hidden = false;
      if (approvalId) {
        // An approval is good for one response.
        approvalId = "";
        approvalState.textContent = "The approval was used for this response; another try needs a new approval.";
      }
      // The challenge is spent: clear it so it is not sent twice.
      challenge.value = "";
      checksum.value = "";
      update();
      result.querySelector("h2").focus();
    } catch (e) {
      showError(root, e);
    }
  });

  root.querySelector("#copy-response").addEventListener("click", async () => {
    const groups = field(root, "response").textContent;
    const sum = field(root, "response-checksum").textContent;
    try {
      await navigator.clipboard.writeText(`${groups} ${sum}`);
      field(root, "copied").textContent = "Copied the response and its checksum.";
    } catch {
      field(root, "copied").textContent = "The browser did not allow copying; read the response from the screen.";
    }
  });
}

function approvalsPage() {
  const root = show("t-approvals");
  focusHeading();
  const tbody = root.querySelector("tbody");
  const empty = field(root, "empty");
  const own = root.querySelector("#include-own");
  const load = async () => {
    clearError(root);
    try {
      const r = await api("GET", `/approvals?include_own=${own.checked}`);
      tbody.replaceChildren();
      for (const a of r.approvals) {
        const row = el("tr");
        const decide = el("td");
        const box = el("div", null, { class: "actions" });
        const mine = me?.operator && a.requester_id === me.operator.id;
        const label = `${humanise(a.action)} for ${a.user_display_name || a.user_id}`;
        if (mine) {
          const cancel = el("button", "Cancel", { type: "button", class: "secondary", "aria-label": `Cancel my request: ${label}` });
          cancel.addEventListener("click", () => decideApproval(root, a.id, "cancel", {}, load));
          box.append(cancel);
        } else {
          const approve = el("button", "Approve", { type: "button", "aria-label": `Approve ${label}` });
          approve.addEventListener("click", () => decideApproval(root, a.id, "approve", { comment: "" }, load));
          const reject = el("button", "Reject", { type: "button", class: "secondary", "aria-label": `Reject ${label}` });
          reject.addEventListener("click", () => decideApproval(root, a.id, "reject", { reason: "rejected in the console" }, load));
          box.append(approve, reject);
        }
        decide.append(box);
        row.append(
          el("td", a.requester_name || a.requester_id),
          el("td", humanise(a.action)),
          el("td", a.user_display_name || a.user_id),
          el("td", a.card_serial || a.credential_id),
          el("td", a.reason),
          el("td", when(a.expires_at)),
          decide,
        );
        tbody.append(row);
      }
      empty.hidden = r.approvals.length !== 0;
    } catch (e) {
      showError(root, e);
    }
  };
  own.addEventListener("change", load);
  root.querySelector("#refresh-approvals").addEventListener("click", load);
  load();
}

async function decideApproval(root, id, verb, body, reload) {
  clearError(root);
  try {
    const r = await api("POST", `/approvals/${enc(id)}/${verb}`, body);
    announce.textContent = `The request is now ${humanise(r.approval?.state)}.`;
    await reload();
    focusHeading();
  } catch (e) {
    showError(root, e);
  }
}

function auditPage() {
  const root = show("t-audit");
  focusHeading();
  const tbody = root.querySelector("tbody");
  const form = root.querySelector("#audit-form");
  const load = async () => {
    clearError(root);
    const params = new URLSearchParams({ descending: "true", page_size: "100" });
    const user = root.querySelector("#audit-user").value.trim();
    const request = root.querySelector("#audit-request").value.trim();
    if (user) params.set("user_id", user);
    if (request) params.set("request_id", request);
    try {
      const r = await api("GET", `/audit?${params}`);
      tbody.replaceChildren();
      for (const rec of r.records) {
        const row = el("tr");
        row.append(
          el("td", rec.sequence),
          el("td", when(rec.recorded_at)),
          el("td", humanise(rec.event)),
          el("td", rec.outcome),
          el("td", rec.actor_id),
          el("td", rec.on_behalf_of_user_id),
          el("td", rec.flow === "unspecified" ? "" : humanise(rec.flow)),
          el("td", rec.request_id, { class: "mono" }),
          el("td", rec.reason),
        );
        tbody.append(row);
      }
      announce.textContent = `${r.records.length} audit records.`;
    } catch (e) {
      showError(root, e);
    }
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    load();
  });
  load();
}

// ---- routing ----

function route() {
  const hash = location.hash || "#/whoami";
  const [path, query] = hash.slice(1).split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query ?? "");
  for (const a of document.querySelectorAll(".top nav a")) {
    if (a.getAttribute("href") === `#/${parts[0]}`) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  switch (parts[0]) {
    case "search":
      return searchPage(params);
    case "user":
      return userPage(parts[1]);
    case "unblock":
      return unblockPage(parts[1], parts[2]);
    case "approvals":
      return approvalsPage();
    case "audit":
      return auditPage();
    default:
      return whoAmIPage();
  }
}

window.addEventListener("hashchange", route);
loadMe().then(route);
