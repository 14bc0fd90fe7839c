// The agentcomms dashboard page: a plain ES module, no framework, no build step.
// Everything the API returns is written with textContent (never innerHTML): agent ids,
// intents and answers are data from other processes.

const TOKEN_KEY = "agentcomms.dashboard.token";
const FLOW_CAP = 200;
const AGENTS_EVERY_MS = 5000;
const STATUS_TIMEOUT_S = 5;

// -- small helpers -------------------------------------------------------------------------------

const byId = (id) => document.getElementById(id);

/** A new element: attributes (``text`` sets textContent, ``on*`` adds listeners), then children (text is text). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function show(node, visible) {
  node.hidden = !visible;
}

function say(node, text, kind = "") {
  node.textContent = text;
  node.classList.toggle("error", kind === "error");
  node.classList.toggle("ok", kind === "ok");
}

function pretty(value) {
  return JSON.stringify(value, null, 2);
}

function clock(seconds) {
  const date = new Date(seconds * 1000);
  const pad = (n, width = 2) => String(n).padStart(width, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
}

function ago(iso) {
  if (!iso) return "never";
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (Number.isNaN(seconds)) return "?";
  if (seconds < 5) return "just now";
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

/** Run ``fn`` at most once per ``ms`` (later calls within the window fold into one trailing call). */
function throttled(fn, ms) {
  let timer = null;
  return () => {
    if (timer === null) {
      timer = setTimeout(() => {
        timer = null;
        fn();
      }, ms);
    }
  };
}

/** ``fn`` (async) never running twice at once: a call while it runs makes it run once more afterwards. */
function singleFlight(fn) {
  let running = null;
  let again = false;
  const run = async () => {
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      try {
        do {
          again = false;
          await fn();
        } while (again);
      } finally {
        running = null;
      }
    })();
    return running;
  };
  return run;
}

// -- the API, with the bearer token when the server wants one ------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const problem = body && typeof body === "object" ? body : {};
    super(problem.detail || problem.title || (typeof body === "string" && body) || `HTTP ${status}`);
    this.status = status;
    this.code = problem.code || `http_${status}`;
    this.problem = problem;
  }
}

let tokenPrompt = null;

/** Ask for the token (once for every caller waiting at the same time); resolves when one is entered. */
function askForToken(rejected) {
  if (tokenPrompt) return tokenPrompt;
  const dialog = byId("token-dialog");
  const form = byId("token-form");
  const input = byId("token-input");
  const error = byId("token-error");
  setConnection("token", "token needed");
  error.textContent = rejected ? "That token was not accepted: try again." : "";
  show(error, rejected);
  input.value = "";
  tokenPrompt = new Promise((resolve) => {
    const submitted = (event) => {
      event.preventDefault();
      const token = input.value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      form.removeEventListener("submit", submitted);
      dialog.close();
      tokenPrompt = null;
      resolve();
    };
    form.addEventListener("submit", submitted);
  });
  dialog.addEventListener("cancel", (event) => event.preventDefault(), { once: true }); // no way on without one
  dialog.showModal();
  input.focus();
  return tokenPrompt;
}

/** fetch with the token; on 401 asks for a (new) token and tries again. */
async function authorizedFetch(path, init = {}) {
  for (;;) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = { ...(init.headers || {}) };
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    await response.body?.cancel();
    if (sessionStorage.getItem(TOKEN_KEY) !== token) continue; // another request got a new token meanwhile
    sessionStorage.removeItem(TOKEN_KEY);
    await askForToken(Boolean(token));
  }
}

/** Call the JSON API: the parsed body, or an ApiError carrying the problem details. */
async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await authorizedFetch(path, init);
  const type = response.headers.get("content-type") || "";
  const payload = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) throw new ApiError(response.status, payload);
  return payload;
}

function describe(error) {
  if (error instanceof ApiError) return `${error.code}: ${error.message}`;
  return `the dashboard did not answer (${error.message || error})`;
}

// -- connection state ----------------------------------------------------------------------------

function setConnection(state, text) {
  const node = byId("connection");
  if (node.dataset.state === state && byId("connection-text").textContent === text) return;
  node.dataset.state = state;
  byId("connection-text").textContent = text;
}

// -- agents --------------------------------------------------------------------------------------

const agents = { list: [], byId: new Map() };

function chipList(items) {
  const list = el("ul", { class: "tags" });
  for (const item of items) list.append(el("li", { text: item }));
  return list;
}

function statusCell(status) {
  const value = String(status || "unknown");
  return el("span", { class: `status status-${value}` }, el("span", { class: "dot", "aria-hidden": "true" }), value);
}

function renderAgents() {
  const body = byId("agents-table").tBodies[0];
  const rows = agents.list.map((agent) =>
    el(
      "tr",
      { "data-agent-id": agent.agent_id },
      el("td", {}, el("span", { class: "id", text: agent.agent_id }), el("span", { class: "muted small", text: agent.user_name })),
      el("td", { text: agent.role }),
      el("td", { text: agent.department }),
      el("td", {}, statusCell(agent.status)),
      el("td", {}, chipList(agent.capabilities || [])),
      el("td", {}, chipList(agent.supported_intents || [])),
      el("td", {}, el("time", { datetime: agent.last_seen || "", title: agent.last_seen ? new Date(agent.last_seen).toLocaleString() : null, text: ago(agent.last_seen) })),
    ),
  );
  body.replaceChildren(...rows);
  show(byId("agents-empty"), agents.list.length === 0);
  const online = agents.list.filter((agent) => agent.status !== "offline").length;
  byId("agents-summary").textContent = `${agents.list.length} registered, ${online} online`;
}

/** Refill ``select`` with ``options`` ([value, label] or {group, options}), keeping the chosen value if still there. */
function fillSelect(select, placeholder, entries) {
  const chosen = select.value;
  const nodes = [el("option", { value: "", text: placeholder })];
  const values = new Set([""]);
  for (const entry of entries) {
    if (entry.group) {
      const group = el("optgroup", { label: entry.group });
      for (const [value, label] of entry.options) {
        group.append(el("option", { value, text: label }));
        values.add(value);
      }
      if (entry.options.length) nodes.push(group);
    } else {
      nodes.push(el("option", { value: entry[0], text: entry[1] }));
      values.add(entry[0]);
    }
  }
  const before = [...select.options].map((option) => `${option.value}\u0000${option.text}`).join("\u0001");
  const after = nodes
    .flatMap((node) => (node.tagName === "OPTGROUP" ? [...node.children] : [node]))
    .map((option) => `${option.value}\u0000${option.textContent}`)
    .join("\u0001");
  if (before === after) return; // unchanged: leave the control alone (it may be open)
  select.replaceChildren(...nodes);
  select.value = values.has(chosen) ? chosen : "";
}

function refreshChoices() {
  const sorted = (values) => [...new Set(values)].filter(Boolean).sort();
  const departments = sorted(agents.list.map((agent) => agent.department));
  const roles = sorted(agents.list.map((agent) => agent.role));
  const seen = sorted([...agents.byId.keys(), ...flow.events.flatMap((e) => [e.sender_id, e.recipient_id])]);

  fillSelect(byId("flow-agent"), "any", seen.map((id) => [id, id]));
  fillSelect(byId("flow-department"), "any", departments.map((d) => [d, d]));
  fillSelect(byId("department-select"), "choose a department…", departments.map((d) => [d, d]));
  fillSelect(byId("ask-target"), "choose an agent or a role…", [
    {
      group: "An agent",
      options: agents.list.map((a) => [`agent:${a.agent_id}`, `${a.agent_id} (${a.role}, ${a.status})`]),
    },
    { group: "Any online agent of a role", options: roles.map((role) => [`role:${role}`, `any ${role}`]) },
  ]);
  const intents = sorted(agents.list.flatMap((agent) => agent.supported_intents || []));
  const datalist = byId("intent-list");
  if (datalist.options.length !== intents.length || [...datalist.options].some((o, i) => o.value !== intents[i])) {
    datalist.replaceChildren(...intents.map((intent) => el("option", { value: intent })));
  }
}

const refreshAgents = singleFlight(async () => {
  const error = byId("agents-error");
  try {
    const list = await api("api/agents");
    list.sort((a, b) => a.agent_id.localeCompare(b.agent_id));
    agents.list = list;
    agents.byId = new Map(list.map((agent) => [agent.agent_id, agent]));
    renderAgents();
    refreshChoices();
    show(error, false);
  } catch (exc) {
    error.textContent = `Could not list the agents: ${describe(exc)}`;
    show(error, true);
  }
});

const agentsSoon = throttled(refreshAgents, 500);

// -- the live message flow -----------------------------------------------------------------------

const flow = { events: [], fresh: [] };
const KINDS = new Set(["sent", "handled", "dead_lettered"]);

function flowFilter() {
  const agent = byId("flow-agent").value;
  const department = byId("flow-department").value;
  const intent = byId("flow-intent").value.trim().toLowerCase();
  const kind = byId("flow-kind").value;
  const members = department
    ? new Set(agents.list.filter((a) => a.department === department).map((a) => a.agent_id))
    : null;
  return (event) =>
    (!agent || event.sender_id === agent || event.recipient_id === agent) &&
    (!members || members.has(event.sender_id) || members.has(event.recipient_id)) &&
    (!intent || String(event.intent || "").toLowerCase().includes(intent)) &&
    (!kind || event.event === kind);
}

function flowRow(event) {
  return el(
    "tr",
    { "data-kind": event.event, "data-message-id": event.message_id },
    el("td", {}, el("time", { datetime: new Date(event.ts * 1000).toISOString(), text: clock(event.ts) })),
    el(
      "td",
      {},
      el("span", { class: "id", text: event.sender_id || "?" }),
      el("span", { class: "arrow", "aria-label": "to", text: " → " }),
      el("span", { class: "id", text: event.recipient_id || "?" }),
    ),
    el("td", { text: event.intent || "" }),
    el("td", {}, el("span", { class: `kind kind-${event.event}`, title: event.reason || null, text: event.event })),
  );
}

/** Every row again (the filters changed, or the list was cleared). */
function renderFlow() {
  flow.fresh = [];
  const keep = flowFilter();
  const shown = flow.events.filter(keep);
  byId("flow-table").tBodies[0].replaceChildren(...shown.map(flowRow));
  flowSummary(shown.length);
}

/** Only the events that arrived since the last frame: their rows on top, the oldest rows out (a full list costs
 *  one row per event, not two hundred). */
function renderFlowNew() {
  const keep = flowFilter();
  const fresh = flow.fresh.filter(keep);
  flow.fresh = [];
  const body = byId("flow-table").tBodies[0];
  if (fresh.length) body.prepend(...fresh.map(flowRow));
  const shown = flow.events.filter(keep).length;
  while (body.rows.length > shown) body.lastElementChild.remove();
  flowSummary(shown);
}

function flowSummary(shown) {
  const empty = byId("flow-empty");
  empty.textContent = flow.events.length ? "No message matches the filters." : "Waiting for messages…";
  show(empty, shown === 0);
  byId("flow-summary").textContent = `${shown} of the last ${flow.events.length} shown`;
}

let flowFrame = null;
function renderFlowSoon() {
  if (flowFrame === null) {
    flowFrame = requestAnimationFrame(() => {
      flowFrame = null;
      renderFlowNew();
    });
  }
}

const choicesSoon = throttled(refreshChoices, 1000);
const deadLettersSoon = throttled(() => refreshDeadLetters(), 1000);

function onFeedEvent(kind, event) {
  if (kind === "subscribed" || kind === "resubscribed") {
    setConnection("live", "live");
    if (kind === "resubscribed") agentsSoon();
    return;
  }
  if (!KINDS.has(kind) || typeof event !== "object" || event === null) return;
  event.event = kind;
  if (typeof event.ts !== "number") event.ts = Date.now() / 1000;
  flow.events.unshift(event);
  flow.fresh.unshift(event);
  if (flow.events.length > FLOW_CAP) flow.events.length = FLOW_CAP;
  if (flow.fresh.length > FLOW_CAP) flow.fresh.length = FLOW_CAP;
  renderFlowSoon();
  if (!agents.byId.has(event.sender_id) || !agents.byId.has(event.recipient_id)) {
    agentsSoon(); // someone new (or the dashboard itself): the registry may know more now
    choicesSoon();
  }
  if (kind === "dead_lettered") deadLettersSoon();
  if (kind !== "sent") conversationsSoon(); // handled or dead-lettered: the record has it now
}

/** Split a Server-Sent Events stream into events (``event:``/``data:`` lines, blank line ends one). */
function sseParser(dispatch) {
  let buffer = "";
  let carriage = false;
  return (chunk) => {
    let text = (carriage ? "\r" : "") + chunk;
    carriage = text.endsWith("\r");
    if (carriage) text = text.slice(0, -1);
    buffer += text.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue; // a comment: the server's keep-alive
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") name = value;
        else if (field === "data") data.push(value);
      }
      if (data.length) dispatch(name, data.join("\n"));
    }
  };
}

/** The feed over fetch (not EventSource: it cannot send the Authorization header), reconnecting with backoff. */
async function followFeed() {
  let attempt = 0;
  for (;;) {
    try {
      const response = await authorizedFetch("api/events", { headers: { Accept: "text/event-stream" }, cache: "no-store" });
      if (!response.ok || !response.body) throw new ApiError(response.status, await response.text());
      attempt = 0;
      const feed = sseParser((name, data) => {
        let event;
        try {
          event = JSON.parse(data);
        } catch {
          return; // not JSON: not one of ours
        }
        onFeedEvent(name, event);
      });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        feed(value);
      }
    } catch {
      // the server went away or refused: shown as the connection state, tried again below
    }
    setConnection("reconnecting", "reconnecting…");
    const wait = Math.min(10000, 500 * 2 ** attempt);
    attempt += 1;
    await new Promise((resolve) => setTimeout(resolve, wait));
  }
}

// -- ask an agent ----------------------------------------------------------------------------------

async function ask(event) {
  event.preventDefault();
  const status = byId("ask-status");
  const answer = byId("ask-answer");
  const button = byId("ask-submit");
  const target = byId("ask-target").value;
  if (!target) {
    say(status, "Choose an agent or a role to ask.", "error");
    byId("ask-target").focus();
    return;
  }
  const timeout = Number(byId("ask-timeout").value) || 10;
  const requesterRole = byId("ask-role").value.trim();
  const data = { query: byId("ask-question").value };
  if (requesterRole) data.requester_role = requesterRole;
  const conversationId = newConversationId();
  const body = { intent: byId("ask-intent").value.trim() || "request_knowledge", data, timeout, conversation_id: conversationId };
  const [kind, ...rest] = target.split(":");
  body[kind === "role" ? "role" : "recipient_id"] = rest.join(":");

  button.disabled = true;
  answer.classList.remove("failed");
  say(status, `Waiting for the answer (up to ${timeout} s)…`);
  const started = performance.now();
  try {
    const reply = await api("api/ask", { method: "POST", body });
    const took = Math.round(performance.now() - started);
    if (reply.success) {
      say(status, `Answered by ${reply.responder_id || "?"} in ${took} ms.`, "ok");
      answer.textContent = pretty(reply.data);
    } else {
      const error = reply.error || {};
      say(status, `${reply.responder_id || "The agent"} answered with an error: ${error.code || "error"}.`, "error");
      answer.textContent = pretty(reply);
      answer.classList.add("failed");
    }
  } catch (exc) {
    const timedOut = exc instanceof ApiError && exc.status === 504;
    say(status, timedOut ? `No answer within ${timeout} s.` : `Not asked: ${describe(exc)}`, "error");
    answer.textContent = exc instanceof ApiError ? pretty(exc.problem) : String(exc);
    answer.classList.add("failed");
  } finally {
    show(answer, true);
    button.disabled = false;
    const link = byId("ask-conversation");
    link.textContent = `Show conversation ${conversationId}`;
    link.onclick = () => openConversation(conversationId);
    show(link, true);
  }
}

/** A version 7 UUID (what agentcomms makes too): its time lets the record find the conversation fast. */
function newConversationId() {
  const hex = [...crypto.getRandomValues(new Uint8Array(10))].map((b) => b.toString(16).padStart(2, "0")).join("");
  const time = Date.now().toString(16).padStart(12, "0");
  const variant = "89ab"[parseInt(hex[3], 16) & 3];
  return `${time.slice(0, 8)}-${time.slice(8)}-7${hex.slice(0, 3)}-${variant}${hex.slice(4, 7)}-${hex.slice(7, 19)}`;
}

// -- department status -----------------------------------------------------------------------------

async function departmentStatus(event) {
  event.preventDefault();
  const department = byId("department-select").value;
  const status = byId("department-status");
  const table = byId("department-table");
  const button = byId("department-submit");
  if (!department) {
    say(status, "Choose a department.", "error");
    return;
  }
  button.disabled = true;
  say(status, `Asking ${department}…`);
  try {
    const members = await api(`api/agents?department=${encodeURIComponent(department)}`);
    const askOne = async (agent) => {
      if (agent.status === "offline") return { state: "offline" };
      try {
        const reply = await api("api/ask", {
          method: "POST",
          body: { recipient_id: agent.agent_id, intent: "agent_status", data: { requested_by: "dashboard" }, timeout: STATUS_TIMEOUT_S },
        });
        return { state: reply.success ? "answered" : "error", reply };
      } catch (exc) {
        if (exc instanceof ApiError && exc.status === 504) return { state: "silent" };
        return { state: "error", reply: exc instanceof ApiError ? exc.problem : String(exc) };
      }
    };
    const answers = await Promise.all(members.map(askOne));
    const rows = members.map((agent, i) => {
      const { state, reply } = answers[i];
      const shown = reply === undefined ? "" : reply.success ? reply.data : reply.error || reply;
      const answerCell = el("td", {}, el("span", { class: `state state-${state}`, text: state }));
      if (shown !== "" && shown !== null && shown !== undefined) {
        answerCell.append(el("details", {}, el("summary", { text: "reply" }), el("pre", { class: "json small", text: pretty(shown) })));
      }
      return el("tr", {}, el("td", { class: "id", text: agent.agent_id }), el("td", { text: agent.role }), el("td", {}, statusCell(agent.status)), answerCell);
    });
    table.tBodies[0].replaceChildren(...rows);
    show(table, rows.length > 0);
    const answered = answers.filter((a) => a.state === "answered").length;
    say(status, rows.length ? `${answered} of ${rows.length} answered.` : `No agent in ${department}.`);
  } catch (exc) {
    say(status, `Could not ask: ${describe(exc)}`, "error");
  } finally {
    button.disabled = false;
  }
}

// -- dead letters ----------------------------------------------------------------------------------

const dead = { agent: null, counts: [], listed: 0 };

function renderDeadLetterAgents() {
  const total = dead.counts.reduce((sum, item) => sum + item.count, 0);
  byId("deadletters-summary").textContent = total ? `${total} in all${dead.agent ? "" : ": choose an agent"}` : "none";
  const list = byId("deadletter-agents");
  list.replaceChildren(
    ...dead.counts.map(({ agent_id: agentId, count }) =>
      el(
        "li",
        {},
        el(
          "button",
          { type: "button", class: "chip", "aria-pressed": String(agentId === dead.agent), onclick: () => openDeadLetters(agentId) },
          el("span", { class: "id", text: agentId }),
          el("span", { class: "count", text: String(count) }),
        ),
      ),
    ),
  );
}

const refreshDeadLetters = singleFlight(async () => {
  const status = byId("deadletters-status");
  try {
    // an agent whose last dead letter was redriven may still be listed, with 0: not worth a button
    dead.counts = (await api("api/deadletters")).filter((item) => item.count > 0);
    renderDeadLetterAgents();
    if (dead.agent) await loadDeadLetters(dead.agent);
  } catch (exc) {
    say(status, `Could not list the dead letters: ${describe(exc)}`, "error");
  }
});

async function openDeadLetters(agentId) {
  dead.agent = agentId;
  renderDeadLetterAgents();
  show(byId("deadletter-json"), false);
  try {
    await loadDeadLetters(agentId);
  } catch (exc) {
    say(byId("deadletters-status"), `Could not list ${agentId}'s dead letters: ${describe(exc)}`, "error");
  }
}

async function loadDeadLetters(agentId) {
  const letters = await api(`api/deadletters/${encodeURIComponent(agentId)}?count=100`);
  if (dead.agent !== agentId) return; // another agent was chosen meanwhile
  byId("deadletter-agent-title").textContent = `Dead letters of ${agentId} (${letters.length})`;
  // one tbody per letter: its row, then its reason (long text) across the whole table
  const groups = letters.map((letter) => {
    const message = letter.message || {};
    const entry = letter.entry_id;
    return el(
      "tbody",
      { class: "letter", "data-entry-id": entry },
      el(
        "tr",
        {},
        el("td", { class: "id nowrap", text: entry }),
        el("td", { text: message.intent || "—" }),
        el("td", { class: "id", text: message.sender_id || "—" }),
        el("td", { class: "number", text: String(letter.deliveries) }),
        el(
          "td",
          { class: "row-actions" },
          el("button", { type: "button", class: "secondary small", "aria-label": `Inspect ${entry}`, text: "Inspect", onclick: () => inspectDeadLetter(agentId, entry) }),
          el("button", { type: "button", class: "small", "aria-label": `Redrive ${entry}`, text: "Redrive", disabled: !letter.message, onclick: () => redrive(agentId, entry) }),
        ),
      ),
      el("tr", { class: "reason-row" }, el("td", { colspan: "5", class: "reason" }, el("span", { class: "label", text: "Reason: " }), letter.reason)),
    );
  });
  const table = byId("deadletter-table");
  for (const old of [...table.tBodies]) old.remove();
  table.append(...groups);
  dead.listed = letters.length;
  byId("deadletter-purge").disabled = letters.length === 0;
  show(byId("deadletter-detail"), true);
}

async function inspectDeadLetter(agentId, entryId) {
  const view = byId("deadletter-json");
  try {
    view.textContent = pretty(await api(`api/deadletters/${encodeURIComponent(agentId)}/${encodeURIComponent(entryId)}`));
  } catch (exc) {
    view.textContent = describe(exc);
  }
  show(view, true);
  view.focus();
}

async function redrive(agentId, entryId) {
  const status = byId("deadletters-status");
  try {
    const result = await api(`api/deadletters/${encodeURIComponent(agentId)}/${encodeURIComponent(entryId)}/redrive`, { method: "POST" });
    say(status, `Redriven ${entryId} into ${result.recipient_id}'s inbox (entry ${result.entry_id}).`, "ok");
  } catch (exc) {
    say(status, `Could not redrive ${entryId}: ${describe(exc)}`, "error");
  }
  show(byId("deadletter-json"), false);
  await refreshDeadLetters();
}

function purge() {
  const agentId = dead.agent;
  if (!agentId) return;
  const dialog = byId("purge-dialog");
  byId("purge-text").textContent = `Delete every dead letter of ${agentId} (${dead.listed} listed)? This cannot be undone.`;
  dialog.returnValue = "cancel";
  dialog.addEventListener(
    "close",
    async () => {
      if (dialog.returnValue !== "purge") return;
      const status = byId("deadletters-status");
      try {
        const result = await api(`api/deadletters/${encodeURIComponent(agentId)}?confirm=true`, { method: "DELETE" });
        say(status, `Purged ${result.purged} dead letter${result.purged === 1 ? "" : "s"} of ${agentId}.`, "ok");
      } catch (exc) {
        say(status, `Could not purge: ${describe(exc)}`, "error");
      }
      show(byId("deadletter-json"), false);
      await refreshDeadLetters();
      byId("deadletters-refresh").focus();
    },
    { once: true },
  );
  dialog.showModal();
}

// -- conversations: the record ---------------------------------------------------------------------

const conversations = { open: null };

function ms(value) {
  if (value === null || value === undefined) return "—";
  return value < 10 ? `${+value.toFixed(2)} ms` : value < 1000 ? `${Math.round(value)} ms` : `${(value / 1000).toFixed(2)} s`;
}

const refreshConversations = singleFlight(async () => {
  const status = byId("conversations-status");
  try {
    const list = await api("api/conversations?limit=20");
    const rows = list.map((c) =>
      el(
        "tr",
        { "data-conversation-id": c.conversation_id },
        el("td", {}, el("time", { datetime: new Date(c.last_at * 1000).toISOString(), text: clock(c.last_at) })),
        el("td", {}, el("span", { text: c.first_intent || "—" }), el("span", { class: "id muted small", text: ` ${c.conversation_id}` })),
        el("td", {}, chipList(c.agents)),
        el("td", { class: "number", text: String(c.messages) }),
        el(
          "td",
          { class: "row-actions" },
          el("button", { type: "button", class: "secondary small", "aria-label": `Show the timeline of ${c.conversation_id}`, text: "Timeline", onclick: () => openConversation(c.conversation_id) }),
        ),
      ),
    );
    byId("conversations-table").tBodies[0].replaceChildren(...rows);
    show(byId("conversations-empty"), rows.length === 0);
    byId("conversations-summary").textContent = rows.length ? `the latest ${rows.length}` : "";
    if (conversations.open) await loadConversation(conversations.open);
  } catch (exc) {
    say(status, `Could not list the conversations: ${describe(exc)}`, "error");
  }
});

const conversationsSoon = throttled(() => refreshConversations(), 1000);

async function openConversation(conversationId) {
  conversations.open = conversationId;
  byId("conversation-id").value = conversationId;
  const status = byId("conversations-status");
  say(status, "");
  try {
    await loadConversation(conversationId);
    byId("timeline-title").focus();
  } catch (exc) {
    show(byId("timeline"), false);
    const missing = exc instanceof ApiError && exc.code === "conversation_not_found";
    say(status, missing ? `Nothing of ${conversationId} is in the record (yet).` : `Could not load it: ${describe(exc)}`, "error");
  }
}

/** A piece of a hop's bar from ``from`` to ``to`` (percent of the conversation), at least a sliver wide. */
function barPart(kind, from, to) {
  const part = el("span", { class: kind });
  part.style.left = `${from}%`;
  part.style.width = `${Math.max(to - from, 0.3)}%`;
  return part;
}

async function loadConversation(conversationId) {
  const timeline = await api(`api/conversations/${encodeURIComponent(conversationId)}`);
  if (conversations.open !== conversationId) return; // another one was opened meanwhile
  const start = timeline.started_at;
  const span = Math.max(timeline.duration_ms, 0.001);
  const at = (seconds) => Math.min(100, Math.max(0, ((seconds - start) * 1000 * 100) / span));
  const hops = timeline.messages.map((hop, index) => {
    const sent = at(hop.sent_at);
    const delivered = hop.delivered_at === null ? sent : at(hop.delivered_at);
    const finished = hop.finished_at === null ? delivered : at(hop.finished_at);
    const outcome = hop.outcome;
    const details = el("details", {}, el("summary", { text: "message and reply" }), el("pre", { class: "json small", text: pretty({ message: hop.message || hop.payload, reply: hop.reply, receipts: hop.receipts, reason: hop.reason }) }));
    return el(
      "li",
      { class: "hop", "data-outcome": outcome, "data-message-id": hop.message_id || "" },
      el(
        "p",
        { class: "hop-head" },
        el("span", { class: "hop-number", text: `${index + 1}.` }),
        el("span", { class: "id", text: hop.sender_id || "?" }),
        el("span", { class: "arrow", "aria-label": "to", text: " → " }),
        el("span", { class: "id", text: hop.agent_id }),
        hop.responder_id && hop.responder_id !== hop.agent_id ? el("span", { class: "id muted", text: `(taken by ${hop.responder_id})` }) : null,
        el("span", { class: "intent", text: hop.intent || "(not a message)" }),
        el("span", { class: `kind outcome-${outcome}`, title: hop.reason || null, text: outcome }),
      ),
      el(
        "div",
        { class: "bar", role: "img", "aria-label": `sent at +${ms((hop.sent_at - start) * 1000)}, waited ${ms(hop.queued_ms)}, handled in ${ms(hop.handling_ms)}` },
        barPart("bar-queued", sent, delivered),
        barPart("bar-handling", delivered, finished),
      ),
      el(
        "p",
        { class: "hop-times muted small" },
        `sent +${ms((hop.sent_at - start) * 1000)} · waited ${ms(hop.queued_ms)} · handled in ${ms(hop.handling_ms)}`,
        hop.reason ? ` · ${hop.reason}` : "",
      ),
      details,
    );
  });
  byId("timeline-list").replaceChildren(...hops);
  byId("timeline-title").textContent = `Timeline of ${conversationId}`;
  const agentsIn = new Set(timeline.messages.flatMap((m) => [m.sender_id, m.agent_id]).filter(Boolean));
  byId("timeline-summary").textContent = `${hops.length} message${hops.length === 1 ? "" : "s"} between ${agentsIn.size} agents, ${ms(timeline.duration_ms)} from the first send to the last answer.`;
  show(byId("timeline"), true);
}

// -- knowledge search ------------------------------------------------------------------------------

async function searchKnowledge(event) {
  event.preventDefault();
  const status = byId("knowledge-status");
  const list = byId("knowledge-results");
  const button = byId("knowledge-submit");
  const role = byId("knowledge-role").value.trim();
  const body = {
    role: role || null, // blank: with security on, the role of the identity the dashboard holds
    query: byId("knowledge-query").value.trim(),
    limit: Number(byId("knowledge-limit").value) || 5,
  };
  button.disabled = true;
  say(status, "Searching…");
  try {
    const results = await api("api/knowledge/search", { method: "POST", body });
    list.replaceChildren(
      ...results.map((result) => {
        const source = result.source || {};
        const where = [source.title || source.location, source.heading].filter(Boolean).join(" › ");
        return el(
          "li",
          {},
          el(
            "p",
            { class: "result-head" },
            el("span", { class: "score", title: "score", text: Number(result.score).toFixed(2) }),
            el("span", { class: "domain", text: result.domain || result.kind || "" }),
            el("span", { class: "where", text: where || "(no source)" }),
          ),
          el("p", { class: "result-text", text: result.text }),
          result.author ? el("p", { class: "muted small", text: `by ${result.author}` }) : null,
        );
      }),
    );
    say(status, results.length ? `${results.length} result${results.length === 1 ? "" : "s"}.` : "Nothing found.");
  } catch (exc) {
    list.replaceChildren();
    const unavailable = exc instanceof ApiError && exc.code === "knowledge_unavailable";
    say(status, unavailable ? `Knowledge search is unavailable: ${exc.message}` : `Search failed: ${describe(exc)}`, "error");
  } finally {
    button.disabled = false;
  }
}

// -- start -----------------------------------------------------------------------------------------

async function showServer() {
  try {
    const health = await api("api/health");
    const redis = health.redis_version ? ` · Redis ${health.redis_version}` : "";
    byId("server-info").textContent = `v${health.version} · sending as ${health.sender_id}${redis}`;
  } catch (exc) {
    byId("server-info").textContent = exc instanceof ApiError && exc.status === 503 ? "Redis does not answer" : "";
  }
}

function start() {
  byId("agents-refresh").addEventListener("click", refreshAgents);
  byId("flow-clear").addEventListener("click", () => {
    flow.events = [];
    renderFlow();
  });
  const filters = byId("flow-filters");
  filters.addEventListener("input", renderFlow);
  filters.addEventListener("change", renderFlow);
  filters.addEventListener("submit", (event) => event.preventDefault());
  byId("ask-form").addEventListener("submit", ask);
  byId("department-form").addEventListener("submit", departmentStatus);
  byId("deadletters-refresh").addEventListener("click", () => {
    say(byId("deadletters-status"), "");
    refreshDeadLetters();
  });
  byId("deadletter-purge").addEventListener("click", purge);
  byId("knowledge-form").addEventListener("submit", searchKnowledge);
  byId("conversations-refresh").addEventListener("click", () => refreshConversations());
  byId("conversation-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = byId("conversation-id").value.trim();
    if (id) openConversation(id);
  });

  renderFlow();
  showServer().then(() => {
    refreshAgents();
    refreshDeadLetters();
    refreshConversations();
    followFeed();
  });
  setInterval(refreshAgents, AGENTS_EVERY_MS);
}

start();
