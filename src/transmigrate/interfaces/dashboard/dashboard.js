// The dashboard: the controller's JSON API, polled (VMs, operations) and read live
// (the watched VM's monitor, four times a second), drawn with uPlot.
"use strict";

const WINDOW = 240;  // live points kept: a minute at four a second
const STEP_COLOURS = ["#4878a8", "#72a84b", "#d9913c", "#8d6bb3", "#3aa3a3", "#c4577a",
                      "#9a8a3a", "#5b5b5b"];
let token = sessionStorage.getItem("transmigrate-token") || "";
let watched = null;
let series = null;
let charts = null;
let faults = null;  // {lab, faults}: what this controller injects, asked once
let previous = null;  // the last reading: rates are differences over time

async function api(path, options = {}) {
  const headers = {"Content-Type": "application/json"};
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(path, {...options, headers});
  if (response.status === 401) {
    document.getElementById("token-box").hidden = false;
    throw new Error("a token is required");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail ? JSON.stringify(body.detail) : response.statusText);
  return body;
}

function cell(row, text) {
  const td = row.insertCell();
  td.textContent = text;
  return td;
}

function say(text, error = false) {
  const message = document.getElementById("message");
  message.textContent = text;
  message.className = error ? "error" : "";
}

async function refreshVms() {
  if (faults === null) {
    faults = await api("/api/faults");
    document.querySelector("#vms th.lab").hidden = !faults.lab;
  }
  const vms = await api("/api/vms");
  const body = document.querySelector("#vms tbody");
  for (const row of [...body.rows]) {
    if (!vms.some(vm => vm.name === row.dataset.vm)) row.remove();
  }
  for (const vm of vms) {
    // Rows are kept, so that a kernel being typed in is not wiped by the refresh.
    let row = body.querySelector(`tr[data-vm="${vm.name}"]`);
    if (!row) row = vmRow(body, vm.name);
    const texts = [vm.name, vm.kernel, vm.status, vm.services.join(", ") || "none declared",
                   vm.standby || "", vm.guard || "not guarded",
                   vm.operation === null ? "" : `#${vm.operation} running`];
    texts.forEach((text, i) => { row.cells[i].textContent = text; });
    row.querySelector("button.watch").textContent = watched === vm.name ? "watching" : "watch";
    row.querySelector("button.update").disabled = vm.operation !== null;
  }
  if (watched === null && vms.length) startWatching(vms[0].name);
}

function vmRow(body, name) {
  const row = body.insertRow();
  row.dataset.vm = name;
  for (let i = 0; i < 7; i++) row.insertCell();
  row.cells[5].className = "guard";
  const watch = document.createElement("button");
  watch.className = "watch";
  watch.onclick = () => startWatching(name);
  row.insertCell().append(watch);
  const kernel = document.createElement("input");
  kernel.placeholder = "6.12.117";
  kernel.className = "kernel";
  const go = document.createElement("button");
  go.textContent = "update";
  go.className = "update";
  go.onclick = () => startUpdate(name, kernel.value.trim());
  row.insertCell().append(kernel, " ", go);
  if (faults.lab) {
    const fault = document.createElement("select");
    fault.className = "fault";
    fault.append(...faults.faults.map(name => new Option(name, name)));
    const inject = document.createElement("button");
    inject.textContent = "inject";
    inject.className = "inject";
    inject.onclick = () => injectFault(name, fault.value);
    row.insertCell().append(fault, " ", inject);
  }
  return row;
}

async function injectFault(vm, fault) {
  say(`injecting ${fault} into ${vm}`);
  try {
    const done = await api(`/api/vms/${vm}/faults`, {method: "POST", body: JSON.stringify({fault})});
    say(`${fault} injected into ${vm}: operation #${done.id}`);
  } catch (error) {
    say(`${fault} not injected into ${vm}: ${error.message}`, true);
  }
}

async function startUpdate(vm, kernel) {
  if (!kernel) return say("say which kernel to update to", true);
  try {
    const started = await api(`/api/vms/${vm}/update`,
                              {method: "POST", body: JSON.stringify({kernel})});
    say(`update of ${vm} to ${kernel} started: operation #${started.operation}`);
  } catch (error) {
    say(`update of ${vm} refused: ${error.message}`, true);
  }
  refreshVms();
}

function chart(element, title, labels, colours) {
  return new uPlot({
    title, width: 460, height: 220,
    scales: {x: {time: true}},
    series: [{}, ...labels.map((label, i) => ({label, stroke: colours[i], width: 2}))],
  }, [[], ...labels.map(() => [])], element);
}

function startWatching(vm) {
  watched = vm;
  document.getElementById("live-title").textContent = `Live: ${vm}`;
  series = {t: [], free: [], R: [], S: [], D: [], processes: [], forkRate: [], cpus: [],
            locks: []};
  previous = null;
  for (const element of ["memory-chart", "tasks-chart", "forks-chart", "cpus-chart",
                         "locks-chart"]) {
    document.getElementById(element).replaceChildren();
  }
  charts = {
    memory: chart(document.getElementById("memory-chart"), "free memory (MiB)",
                  ["free"], ["#4878a8"]),
    tasks: chart(document.getElementById("tasks-chart"), "tasks",
                 ["running", "sleeping", "blocked (D)", "processes"],
                 ["#72a84b", "#4878a8", "#c00", "#999"]),
    forks: chart(document.getElementById("forks-chart"), "forks per second",
                 ["forks/s"], ["#d9913c"]),
    cpus: null,  // drawn once the first reading says how many CPUs there are
    locks: null,  // and which locks the kernel has
  };
  refreshVms();
}

async function readLive() {
  if (watched === null) return;
  const vm = watched;
  let live;
  try {
    live = await api(`/api/vms/${vm}/live`);
  } catch (error) {
    document.getElementById("status").textContent = `(${vm}: ${error.message})`;
    return;
  }
  if (vm !== watched) return;
  const r = live.readings;
  const tasks = r.tasks || {};
  series.t.push(live.at);
  series.free.push(r.memory_free_mib ?? null);
  series.R.push(tasks.R || 0);
  series.S.push(tasks.S || 0);
  series.D.push(tasks.D || 0);
  series.processes.push(r.processes ?? null);
  const cpus = r.cpus || [];
  const seconds = previous === null ? 0 : live.at - previous.at;
  // A counter that went down is a new kernel's (an update or a failover): no rate.
  const rate = (now, before) => seconds > 0 && now !== undefined && before !== undefined &&
    now >= before ? (now - before) / seconds : null;
  series.forkRate.push(rate(r.forks, previous?.readings.forks));
  if (charts.cpus === null && cpus.length) {
    charts.cpus = chart(document.getElementById("cpus-chart"),
                        "context switches per second, per CPU",
                        cpus.map(cpu => `CPU ${cpu.cpu}`), STEP_COLOURS);
    series.cpus = cpus.map(() => series.t.slice(0, -1).map(() => null));
  }
  series.cpus.forEach((points, i) => {
    points.push(rate(cpus[i]?.switches, previous?.readings.cpus?.[i]?.switches));
    if (points.length > WINDOW) points.shift();
  });
  // A lock: 0 free, 1 held, 2 held and waited for (a spinner queued, a mutex waiter,
  // a writer waiting).
  const locks = live.locks || [];
  if (charts.locks === null && locks.length) {
    charts.locks = chart(document.getElementById("locks-chart"),
                         "locks: 1 held, 2 waited for", locks.map(lock => lock.name),
                         STEP_COLOURS);
    series.locks = locks.map(() => series.t.slice(0, -1).map(() => null));
  }
  series.locks.forEach((points, i) => {
    const lock = locks[i];
    points.push(lock === undefined ? null : lock.waiters ? 2 : lock.held ? 1 : 0);
    if (points.length > WINDOW) points.shift();
  });
  previous = live;
  for (const key in series) {
    if (key !== "cpus" && key !== "locks" && series[key].length > WINDOW) series[key].shift();
  }
  charts.memory.setData([series.t, series.free]);
  charts.tasks.setData([series.t, series.R, series.S, series.D, series.processes]);
  charts.forks.setData([series.t, series.forkRate]);
  if (charts.cpus !== null) charts.cpus.setData([series.t, ...series.cpus]);
  if (charts.locks !== null) charts.locks.setData([series.t, ...series.locks]);
  const table = document.querySelector("#cpus tbody");
  table.replaceChildren();
  for (const cpu of cpus) {
    const row = table.insertRow();
    cell(row, `CPU ${cpu.cpu}`);
    cell(row, cpu.running);
    cell(row, `${cpu.switches} switches`);
  }
  for (const lock of locks.filter(lock => lock.held)) {
    const row = table.insertRow();
    cell(row, lock.name);
    cell(row, lock.holder_comm ? `held by ${lock.holder_comm} (${lock.holder_pid})` : "held");
    cell(row, lock.waiters ? "waited for" : "");
  }
  const events = document.getElementById("events");
  events.replaceChildren(...live.events.map(e => {
    const item = document.createElement("li");
    item.textContent = `${e.kind}: ${e.summary}`;
    const evidence = document.createElement("code");
    evidence.textContent = JSON.stringify(e.evidence);
    item.append(evidence);
    return item;
  }));
  document.getElementById("status").textContent =
    `(${vm}: ${new Date(live.at * 1000).toLocaleTimeString()})`;
}

async function refreshOperations() {
  const operations = await api("/api/operations");
  const body = document.querySelector("#operations tbody");
  body.replaceChildren();
  for (const op of operations) {
    const row = body.insertRow();
    row.dataset.operation = op.id;
    row.dataset.outcome = op.outcome;
    cell(row, "#" + op.id);
    cell(row, op.kind === "failover" ? `failover: ${op.request.fault} -> ${op.request.action}`
              : op.kind === "inject" ? `inject ${op.request.fault}`
              : op.kind === "up" ? `up on ${op.request.kernel}`
              : op.kind === "guard" ? "guard (the command)"
              : `${op.kind} to ${op.request.kernel || ""}`);
    cell(row, op.vm);
    cell(row, new Date(op.started_at * 1000).toLocaleString());
    cell(row, op.finished_at ? `${(op.finished_at - op.started_at).toFixed(1)} s` : "");
    cell(row, op.downtime_seconds === null ? "" : `${op.downtime_seconds.toFixed(3)} s`)
      .className = "downtime";
    cell(row, op.outcome + (op.error ? `: ${op.error}` : "")).title =
      op.report.logs ? `logs: ${op.report.logs}` : "";
    const steps = op.report.steps || {};
    const total = Object.values(steps).reduce((a, b) => a + b, 0);
    const bar = document.createElement("div");
    bar.className = "bar";
    Object.entries(steps).forEach(([step, seconds], i) => {
      const part = document.createElement("span");
      part.style.width = `${Math.max(2, 400 * seconds / total)}px`;
      part.style.background = STEP_COLOURS[i % STEP_COLOURS.length];
      part.title = `${step}: ${seconds.toFixed(2)} s`;
      bar.append(part);
    });
    row.insertCell().append(bar);
  }
}

document.getElementById("token-save").onclick = () => {
  token = document.getElementById("token").value;
  sessionStorage.setItem("transmigrate-token", token);
  document.getElementById("token-box").hidden = true;
};

async function every(seconds, action) {
  try {
    await action();
  } catch (error) {
    document.getElementById("status").textContent = `(${error.message})`;
  }
  setTimeout(() => every(seconds, action), seconds * 1000);
}

every(2, refreshVms);
every(2, refreshOperations);
every(0.25, readLive);
