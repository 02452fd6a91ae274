// The stream console's only script: tabs, copy buttons, the test hit and the live figures.
// Plain JavaScript, no dependencies; every control also works from the keyboard.
"use strict";

function setupTabs() {
  const tabs = Array.from(document.querySelectorAll('[role="tab"]'));
  if (tabs.length === 0) return;
  const select = (tab, focus) => {
    for (const other of tabs) {
      const selected = other === tab;
      other.setAttribute("aria-selected", selected ? "true" : "false");
      other.tabIndex = selected ? 0 : -1;
      document.getElementById(other.getAttribute("aria-controls")).hidden = !selected;
    }
    if (focus) tab.focus();
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab, false));
    // Arrow keys move between tabs, Home and End to the first and last (WAI-ARIA tabs).
    tab.addEventListener("keydown", (event) => {
      const moves = {
        ArrowRight: i + 1,
        ArrowLeft: i - 1,
        Home: 0,
        End: tabs.length - 1,
      };
      if (!(event.key in moves)) return;
      event.preventDefault();
      select(tabs[(moves[event.key] + tabs.length) % tabs.length], true);
    });
  });
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  // Plain http on another host than localhost: the older way.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "absolute";
  area.style.left = "-9999px";
  document.body.appendChild(area);
  area.select();
  const ok = document.execCommand("copy");
  area.remove();
  if (!ok) throw new Error("copy refused");
}

function setupCopy() {
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", async () => {
      const code = document.getElementById(button.dataset.target);
      const status = button.parentElement.querySelector(".copied");
      try {
        await copyText(code.textContent);
        status.textContent = "Copied.";
      } catch (error) {
        status.textContent = "Could not copy: select the code and copy it by hand.";
      }
    });
  }
}

function setupTestHit() {
  const button = document.getElementById("send-test");
  if (!button) return;
  const result = document.getElementById("test-result");
  button.addEventListener("click", async () => {
    button.disabled = true;
    result.textContent = "Sending…";
    try {
      const response = await fetch(button.dataset.url, {
        method: "POST",
        headers: { "X-Hookpipe-Console": "1" },
      });
      const answer = await response.json();
      if (answer.status === 202 && answer.hit_id) {
        result.innerHTML = "";
        result.append("Accepted (202), hit_id ");
        const id = document.createElement("code");
        id.id = "test-hit-id";
        id.textContent = answer.hit_id;
        result.append(id, ". Its row appears in the table within seconds.");
      } else {
        result.textContent = `Not accepted: ${answer.status} ${answer.error || ""}`.trim();
      }
    } catch (error) {
      result.textContent = `The console could not reach the gateway: ${error}`;
    } finally {
      button.disabled = false;
      refreshFigures();
    }
  });
}

function ago(seconds) {
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  return `${Math.floor(seconds / 3600)} h ago`;
}

async function refreshFigures() {
  const figures = document.getElementById("figures");
  if (!figures) return;
  try {
    const response = await fetch(figures.dataset.url);
    const stats = await response.json();
    document.getElementById("accepted").textContent = String(stats.accepted);
    document.getElementById("refused").textContent = String(stats.refused);
    const last = document.getElementById("last-hit");
    if (stats.last_accepted_at) {
      const at = new Date(stats.last_accepted_at * 1000);
      const seconds = Math.max(0, Math.round((Date.now() - at.getTime()) / 1000));
      last.textContent = `${at.toISOString().replace("T", " ").replace(".000Z", " UTC")} (${ago(seconds)})`;
    } else {
      last.textContent = "none since this replica started";
    }
  } catch (error) {
    document.getElementById("figures-note").textContent = `Figures unavailable: ${error}`;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupTabs();
  setupCopy();
  setupTestHit();
  refreshFigures();
  setInterval(refreshFigures, 5000);
});
