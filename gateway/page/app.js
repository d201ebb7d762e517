// The chat page: plain JavaScript, no build step, only the public REST API of this origin.
//
// Sign-in: `#token=<jwt>` in the address (kept in sessionStorage, then removed from the address
// bar) or a pasted token. The user id is the token's `sub`; the page does not verify the token,
// the services do (a refused one is a 401, shown as a message).
"use strict";

(() => {
  const TOKEN_KEY = "todo.token";
  const PAGE_SIZE = 100; // the API's maximum
  const MAX_PAGES = 20; // at most this many pages of tasks or messages are fetched
  // gRPC codes of an `error` event inside a stream, as the HTTP statuses they map to.
  const STATUS_OF_CODE = { 3: 400, 4: 504, 5: 404, 7: 403, 8: 429, 13: 500, 14: 503, 16: 401 };

  const $ = (id) => document.getElementById(id);
  const state = { token: null, user: null, claims: null, conversationId: null, busy: false };

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // ---- identity -------------------------------------------------------------------------

  function claimsOf(token) {
    const parts = token.split(".");
    if (parts.length !== 3) {
      throw new Error("it is not a JWT (a JWT has three dot-separated parts)");
    }
    let claims;
    try {
      let base64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
      base64 += "=".repeat((4 - (base64.length % 4)) % 4);
      const bytes = Uint8Array.from(atob(base64), (char) => char.charCodeAt(0));
      claims = JSON.parse(new TextDecoder().decode(bytes));
    } catch {
      throw new Error("its payload is not readable JSON");
    }
    if (!claims || typeof claims.sub !== "string" || claims.sub === "") {
      throw new Error("it has no `sub` claim (the user id)");
    }
    return claims;
  }

  // `#token=...` -> the token, and the address bar without it (history.replaceState: no reload,
  // no new history entry, so Back does not bring the token back either).
  function takeTokenFromAddress() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    if (!params.has("token")) {
      return null;
    }
    const token = params.get("token").trim();
    params.delete("token");
    const rest = params.toString();
    history.replaceState(history.state, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
    return token;
  }

  function signIn(token) {
    let claims;
    try {
      claims = claimsOf(token);
    } catch (error) {
      signOut();
      showNotice(`That token can't be used: ${error.message}.`);
      return;
    }
    state.token = token;
    state.user = claims.sub;
    state.claims = claims;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("user-id").textContent = claims.sub;
    $("who").hidden = false;
    $("signed-out").hidden = true;
    $("signed-in").hidden = false;
    newConversation();
    hideNotice();
    loadConversations().catch(reportError);
    loadTasks().catch(reportError);
  }

  function signOut() {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = state.user = state.claims = null;
    state.conversationId = null;
    $("who").hidden = true;
    $("signed-in").hidden = true;
    $("signed-out").hidden = false;
    $("token-input").value = "";
  }

  // ---- messages to the user ---------------------------------------------------------------

  function showNotice(text, kind = "error") {
    const notice = $("notice");
    notice.className = `notice ${kind}`;
    $("notice-text").textContent = text;
    notice.hidden = false;
  }

  function hideNotice() {
    $("notice").hidden = true;
    $("notice-text").textContent = "";
  }

  function retrySeconds(header) {
    if (!header) {
      return null;
    }
    if (/^\d+$/.test(header.trim())) {
      return Number(header.trim());
    }
    const at = Date.parse(header);
    return Number.isNaN(at) ? null : Math.max(0, Math.ceil((at - Date.now()) / 1000));
  }

  // What a failed call means to the user; `claims`: the token's, at the time of the call.
  function describe(status, message, retryAfter, claims = state.claims) {
    const detail = message ? ` (${message})` : "";
    switch (status) {
      case 0:
        return "Can't reach the gateway. Is the stack running (make up)?";
      case 401: {
        const expired = claims && claims.exp && claims.exp * 1000 < Date.now();
        const why = expired ? `: it expired at ${new Date(claims.exp * 1000).toLocaleString()}` : detail;
        const user = (claims && claims.sub) || "alice";
        return `Your token was refused${why}. Sign in again with a fresh token (make token USER=${user}, or the link make up prints).`;
      }
      case 403:
        return `Not allowed${detail}.`;
      case 404:
        return `Not found${detail}.`;
      case 429: {
        const seconds = retrySeconds(retryAfter);
        const when = seconds === null ? "in a moment" : `in ${seconds} s`;
        return `Too many requests${detail}. Try again ${when}.`;
      }
      case 503:
        return `The service is unavailable right now${detail}. Try again in a moment.`;
      case 504:
        return `That took too long${detail}. Try again.`;
      default:
        return status >= 500 ? `Server error ${status}${detail}.` : `Request refused: ${status}${detail}.`;
    }
  }

  function messageOf(error) {
    return error instanceof ApiError ? error.message : `Something went wrong in the page: ${error.message || error}`;
  }

  function reportError(error) {
    showNotice(messageOf(error));
    if (error instanceof ApiError && error.status === 401) {
      const text = $("notice-text").textContent;
      signOut();
      showNotice(text);
    }
  }

  // ---- REST -------------------------------------------------------------------------------

  async function request(method, path, body) {
    const claims = state.claims;
    const headers = { Authorization: `Bearer ${state.token}` };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
    }
    let response;
    try {
      response = await fetch(`/api/${encodeURIComponent(state.user)}${path}`, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
      });
    } catch {
      throw new ApiError(0, describe(0));
    }
    if (!response.ok) {
      let message = "";
      try {
        const reply = await response.json();
        message = reply && reply.message ? String(reply.message) : "";
      } catch {
        // not JSON: the status says enough
      }
      const retryAfter = response.headers.get("retry-after");
      throw new ApiError(response.status, describe(response.status, message, retryAfter, claims));
    }
    return response;
  }

  async function getJson(path) {
    return (await request("GET", path)).json();
  }

  // Every item of a paginated list (bounded by MAX_PAGES).
  async function collect(path, key) {
    const items = [];
    let pageToken = "";
    const separator = path.includes("?") ? "&" : "?";
    for (let page = 0; page < MAX_PAGES; page += 1) {
      const query = `page_size=${PAGE_SIZE}${pageToken ? `&page_token=${encodeURIComponent(pageToken)}` : ""}`;
      const reply = await getJson(`${path}${separator}${query}`);
      items.push(...(reply[key] || []));
      pageToken = reply.next_page_token;
      if (!pageToken) {
        break;
      }
    }
    return items;
  }

  // Server-Sent Events from a fetch body, as they arrive: one JSON object per `data:` event.
  async function* events(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        break;
      }
      buffer += value;
      let end = buffer.search(/\r?\n\r?\n/);
      while (end >= 0) {
        const separator = buffer.slice(end).match(/^\r?\n\r?\n/)[0];
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + separator.length);
        if (event) {
          yield event;
        }
        end = buffer.search(/\r?\n\r?\n/);
      }
    }
    const last = parseEvent(buffer);
    if (last) {
      yield last;
    }
  }

  function parseEvent(block) {
    const data = block
      .split(/\r?\n/)
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).replace(/^ /, ""))
      .join("\n");
    if (!data) {
      return null;
    }
    try {
      return JSON.parse(data);
    } catch {
      return null;
    }
  }

  // ---- the conversation ---------------------------------------------------------------------

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined) {
      node.textContent = text;
    }
    return node;
  }

  function truncate(text, length) {
    return text.length > length ? `${text.slice(0, length - 1)}…` : text;
  }

  function compact(value) {
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  function argumentsText(args) {
    const entries = Object.entries(args || {});
    return truncate(entries.map(([key, value]) => `${key}: ${compact(value)}`).join(", "), 90);
  }

  function resultText(call) {
    if (call.error !== undefined && call.error !== null) {
      return call.error;
    }
    const result = call.result;
    if (Array.isArray(result)) {
      return result.length === 1 ? "1 task" : `${result.length} tasks`;
    }
    if (result && typeof result === "object") {
      if (Array.isArray(result.results)) {
        return truncate(
          result.results.map((item) => `#${item.task_id} ${item.error ? `error: ${item.error}` : item.status}`).join(", "),
          90,
        );
      }
      const parts = [];
      if (result.status) parts.push(result.status);
      if (result.task_id !== undefined) parts.push(`#${result.task_id}`);
      if (result.title) parts.push(`“${result.title}”`);
      if (result.due_date) parts.push(`due ${result.due_date}${result.due_time ? ` ${result.due_time}` : ""}`);
      if (result.priority && result.priority !== "none") parts.push(`${result.priority} priority`);
      if (parts.length) return parts.join(" ");
    }
    return truncate(compact(result === undefined ? null : result), 90);
  }

  function toolCallItem(call) {
    const failed = call.error !== undefined && call.error !== null;
    const item = element("li", `tool ${failed ? "failed" : "ok"}`);
    const details = element("details");
    const summary = element("summary");
    summary.append(
      element("span", "tool-name", call.name),
      element("span", "tool-args", `(${argumentsText(call.arguments)})`),
      element("span", "tool-arrow", failed ? " ✗ " : " → "),
      element("span", "tool-result", resultText(call)),
    );
    const full = failed ? { arguments: call.arguments, error: call.error } : { arguments: call.arguments, result: call.result };
    details.append(summary, element("pre", "tool-json", JSON.stringify(full, null, 2)));
    item.append(details);
    return item;
  }

  function addMessage(role, text, toolCalls) {
    $("log-empty").hidden = true;
    const article = element("article", `message ${role}`);
    article.append(element("span", "role", role === "user" ? "You" : "Assistant"));
    const tools = element("ul", "tools");
    for (const call of toolCalls || []) {
      tools.append(toolCallItem(call));
    }
    const body = element("div", "text", text);
    article.append(tools, body);
    $("log").append(article);
    scrollLog();
    return { article, tools, body };
  }

  function scrollLog() {
    const log = $("log");
    log.scrollTop = log.scrollHeight;
  }

  function clearLog() {
    for (const node of [...$("log").querySelectorAll("article")]) {
      node.remove();
    }
    $("log-empty").hidden = false;
  }

  function failTurn(reply, text) {
    reply.article.classList.add("failed");
    reply.article.append(element("p", "turn-error", text));
    showNotice(text);
  }

  function setBusy(busy) {
    state.busy = busy;
    $("send").disabled = busy;
    $("new-conversation").disabled = busy;
    for (const button of $("conversation-list").querySelectorAll("button")) {
      button.disabled = busy;
    }
  }

  async function send(text) {
    setBusy(true);
    hideNotice();
    addMessage("user", text);
    const reply = addMessage("assistant", "");
    reply.article.dataset.state = "streaming";
    reply.article.setAttribute("aria-busy", "true");
    let outcome = "cut";
    try {
      const body = { message: text };
      if (state.conversationId !== null) {
        body.conversation_id = state.conversationId;
      }
      const response = await request("POST", "/chat/stream", body);
      for await (const event of events(response)) {
        if (typeof event.delta === "string") {
          reply.body.textContent += event.delta;
        } else if (event.tool_call) {
          reply.tools.append(toolCallItem(event.tool_call));
        } else if (event.done) {
          outcome = "done";
          state.conversationId = event.done.conversation_id;
          reply.body.textContent = event.done.response;
          if (!reply.tools.children.length) {
            for (const call of event.done.tool_calls || []) {
              reply.tools.append(toolCallItem(call));
            }
          }
        } else if (event.error) {
          outcome = "failed";
          const status = STATUS_OF_CODE[event.error.code] || 500;
          failTurn(reply, describe(status, event.error.message, null));
        }
        scrollLog();
      }
      if (outcome === "cut") {
        outcome = "failed";
        failTurn(reply, "The reply was cut off before it finished. Try again.");
      }
    } catch (error) {
      outcome = "failed";
      failTurn(reply, messageOf(error));
      if (error instanceof ApiError && error.status === 401) {
        reportError(error);
      }
    } finally {
      reply.article.dataset.state = outcome;
      reply.article.removeAttribute("aria-busy");
      setBusy(false);
      scrollLog();
    }
    if (state.token) {
      await Promise.all([loadTasks(), loadConversations()]).catch(reportError);
    }
  }

  // ---- conversations ------------------------------------------------------------------------

  async function loadConversations() {
    const reply = await getJson(`/conversations?page_size=${PAGE_SIZE}`);
    const conversations = (reply.conversations || []).slice();
    conversations.sort((a, b) => String(b.updated_at).localeCompare(String(a.updated_at)) || b.id - a.id);
    const list = $("conversation-list");
    list.replaceChildren();
    for (const conversation of conversations) {
      const button = element("button", "conversation", conversation.title || `Conversation ${conversation.id}`);
      button.type = "button";
      button.disabled = state.busy;
      if (conversation.id === state.conversationId) {
        button.setAttribute("aria-current", "true");
      }
      button.addEventListener("click", () => openConversation(conversation).catch(reportError));
      const item = element("li");
      item.append(button);
      list.append(item);
    }
    if (!conversations.length) {
      list.append(element("li", "empty", "None yet."));
    }
    const current = conversations.find((conversation) => conversation.id === state.conversationId);
    if (current) {
      $("chat-title").textContent = current.title || `Conversation ${current.id}`;
    }
  }

  async function openConversation(conversation) {
    if (state.busy) {
      return;
    }
    const messages = await collect(`/conversations/${conversation.id}/messages`, "messages");
    clearLog();
    for (const message of messages) {
      addMessage(message.role === "user" ? "user" : "assistant", message.content, message.tool_calls);
    }
    state.conversationId = conversation.id;
    $("chat-title").textContent = conversation.title || `Conversation ${conversation.id}`;
    await loadConversations();
    $("message").focus();
  }

  function newConversation() {
    state.conversationId = null;
    clearLog();
    $("chat-title").textContent = "New conversation";
    for (const button of $("conversation-list").querySelectorAll("button[aria-current]")) {
      button.removeAttribute("aria-current");
    }
  }

  // ---- tasks --------------------------------------------------------------------------------

  const PRIORITY_RANK = { high: 0, medium: 1, low: 2, none: 3 };

  // Pending first (earliest due first, undated after, then by number), then completed ones.
  function taskOrder(a, b) {
    if (a.completed !== b.completed) {
      return a.completed ? 1 : -1;
    }
    if (!a.completed) {
      const dueA = a.due_date ? `${a.due_date} ${a.due_time || "99:99"}` : "~";
      const dueB = b.due_date ? `${b.due_date} ${b.due_time || "99:99"}` : "~";
      if (dueA !== dueB) {
        return dueA < dueB ? -1 : 1;
      }
      const rank = (PRIORITY_RANK[a.priority] ?? 3) - (PRIORITY_RANK[b.priority] ?? 3);
      if (rank) {
        return rank;
      }
    }
    return a.id - b.id;
  }

  function dueElement(task) {
    const [year, month, day] = task.due_date.split("-").map(Number);
    const date = new Date(year, month - 1, day);
    const label = Number.isNaN(date.getTime())
      ? task.due_date
      : date.toLocaleDateString(undefined, { weekday: "short", month: "short", day: "numeric" });
    const time = element("time", "due", `due ${label}${task.due_time ? ` ${task.due_time}` : ""}`);
    time.dateTime = task.due_time ? `${task.due_date}T${task.due_time}` : task.due_date;
    return time;
  }

  function taskItem(task) {
    const item = element("li", `task${task.completed ? " done" : ""}`);
    item.dataset.taskId = String(task.id);
    const name = `task ${task.id}: ${task.title}`;

    const toggle = element("button", "complete", task.completed ? "Reopen" : "Complete");
    toggle.type = "button";
    toggle.setAttribute("aria-label", `${task.completed ? "Reopen" : "Complete"} ${name}`);
    toggle.addEventListener("click", () => changeTask(item, "PATCH", `/tasks/${task.id}/complete`, { completed: !task.completed }));

    const body = element("div", "task-body");
    const title = element("span", "title");
    title.append(element("span", "number", `#${task.id} `), document.createTextNode(task.title));
    body.append(title);
    const meta = element("div", "meta");
    if (task.due_date) {
      meta.append(dueElement(task));
    }
    if (task.priority && task.priority !== "none") {
      meta.append(element("span", `priority ${task.priority}`, `${task.priority} priority`));
    }
    for (const tag of task.tags || []) {
      meta.append(element("span", "tag", `#${tag}`));
    }
    if (meta.children.length) {
      body.append(meta);
    }
    if (task.description) {
      body.append(element("p", "description", task.description));
    }

    const remove = element("button", "delete", "Delete");
    remove.type = "button";
    remove.setAttribute("aria-label", `Delete ${name}`);
    remove.addEventListener("click", () => changeTask(item, "DELETE", `/tasks/${task.id}`));

    item.append(toggle, body, remove);
    return item;
  }

  async function changeTask(item, method, path, body) {
    for (const button of item.querySelectorAll("button")) {
      button.disabled = true;
    }
    try {
      await request(method, path, body);
      hideNotice();
    } catch (error) {
      reportError(error);
    }
    if (state.token) {
      await loadTasks().catch(reportError);
    }
  }

  async function loadTasks() {
    const tasks = (await collect("/tasks", "tasks")).sort(taskOrder);
    const list = $("task-list");
    list.replaceChildren(...tasks.map(taskItem));
    const pending = tasks.filter((task) => !task.completed).length;
    $("task-count").textContent = tasks.length ? `${pending} pending` : "";
    $("tasks-empty").hidden = tasks.length > 0;
  }

  // ---- wiring -------------------------------------------------------------------------------

  function start() {
    $("boot").hidden = true;
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = $("message").value.trim();
      if (!text || state.busy) {
        return;
      }
      $("message").value = "";
      send(text).catch(reportError);
    });
    $("message").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      signIn($("token-input").value.trim());
    });
    $("sign-out").addEventListener("click", () => {
      signOut();
      hideNotice();
    });
    $("notice-close").addEventListener("click", hideNotice);
    $("new-conversation").addEventListener("click", () => {
      newConversation();
      $("message").focus();
    });
    $("refresh-tasks").addEventListener("click", () => loadTasks().then(hideNotice, reportError));
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible" && state.token && !state.busy) {
        loadTasks().catch(reportError);
      }
    });
    window.addEventListener("unhandledrejection", (event) => {
      event.preventDefault();
      reportError(event.reason);
    });

    // A new `#token=` link opened on this page already: a same-document navigation, no reload.
    window.addEventListener("hashchange", () => {
      const token = takeTokenFromAddress();
      if (token !== null) {
        signIn(token);
      }
    });

    const token = takeTokenFromAddress() || sessionStorage.getItem(TOKEN_KEY);
    if (token) {
      signIn(token);
    } else {
      signOut();
    }
  }

  start();
})();
