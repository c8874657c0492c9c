// The dashboard: keeps what the WebSocket says about jobs, the plotter and the
// daemon, and shows it. Actions and uploads go over the HTTP API.
//
// The other modules are loaded with this module's own query string, which
// carries ?api_key=KEY when the daemon wants the key for every file (see
// index.html); a plain `import` would drop it.

const query = new URL(import.meta.url).search;
const [{ Api, ApiError }, { Stream }, { Preview }, format] = await Promise.all([
  import(`./api.js${query}`),
  import(`./stream.js${query}`),
  import(`./preview.js${query}`),
  import(`./format.js${query}`),
]);
const { PlotterList } = await import(`./plotters.js${query}`);

// States in which a job holds the plotter (vfab.jobs.states.ACTIVE).
const ACTIVE = new Set(["plotting", "paused", "awaiting_pen"]);
const FINISHED = new Set(["completed", "failed", "cancelled"]);
// The queue shows every unfinished job and this many finished ones.
const FINISHED_SHOWN = 20;
// What each state lets the operator do, in the order the buttons appear.
const ACTIONS = {
  queued: ["cancel"],
  plotting: ["pause", "cancel"],
  paused: ["resume", "cancel"],
  awaiting_pen: ["resume", "cancel"],
  interrupted: ["resume", "cancel"],
};
const ACTION_LABELS = { pause: "Pause", resume: "Resume", cancel: "Cancel" };
const ALERT_SECONDS = { info: 15, success: 15 };

const state = {
  jobs: new Map(),      // id -> job, as the daemon last described it
  jobsKnown: false,     // whether `jobs` holds what the daemon said (not just nothing yet)
  jobNews: 0,           // how many job_list and job_state_change messages have come
  progress: new Map(),  // id -> the last job_progress message
  reasons: new Map(),   // id -> the reason of its last state change
  device: null,
  system: null,
  systemReceived: 0,    // Date.now() when the last system_status came
  live: false,          // whether the WebSocket is subscribed
  currentId: null,      // the job the "Now plotting" card shows
};

const $ = (id) => document.getElementById(id);
const api = new Api();
const preview = new Preview($("preview"));
const plotters = new PlotterList($("plotters"), format.stateLabel);
const previews = new Map();  // id -> preview document (a drawing never changes)
let previewShown = null;

// -- messages from the daemon --------------------------------------------------

function handle(message) {
  switch (message.type) {
    case "job_list":
      state.jobs = new Map((message.jobs || []).map((job) => [job.id, job]));
      state.jobsKnown = true;
      state.jobNews += 1;
      break;
    case "job_state_change":
      jobChanged(message);
      break;
    case "job_progress":
      state.progress.set(message.job_id, message);
      if (state.jobs.has(message.job_id)) {
        state.jobs.get(message.job_id).progress = message.progress;
      }
      break;
    case "device_status":
      plotters.update(message);
      // The "Plotter" card shows the first plotter; the list shows them all.
      if (!state.device || state.device.plotter === message.plotter) {
        state.device = message;
      }
      break;
    case "system_status":
      state.system = message;
      state.systemReceived = Date.now();
      break;
    case "system_alert":
      showAlert(message.severity, message.title, message.message);
      return;
    case "error":
      showAlert("warning", "The daemon refused a message", message.error_message);
      return;
    default:
      return;
  }
  render();
}

function jobChanged(message) {
  state.jobNews += 1;
  const known = state.jobs.get(message.job_id);
  const job = message.job || { ...(known || { id: message.job_id }), state: message.to_state };
  state.jobs.set(job.id, job);
  state.reasons.set(job.id, message.reason || "");
  if (!ACTIVE.has(job.state)) {
    // Its ETA means nothing once it stops; the job's own progress stays.
    state.progress.delete(job.id);
  }
}

// -- rendering --------------------------------------------------------------------

function render() {
  renderSystem();
  renderDevice();
  // Until the daemon has said, the page keeps what it came with (see takeOver).
  if (state.jobsKnown) {
    renderCurrent();
    renderJobs();
  }
}

function setBadge(element, value) {
  element.dataset.state = value || "unknown";
  element.textContent = format.stateLabel(value);
}

function renderSystem() {
  const system = state.system;
  if (!system) {
    return;
  }
  setBadge($("system-badge"), system.status);
  $("system-status").textContent = system.status;
  $("system-memory").textContent = format.percent(system.memory_usage);
  $("system-cpu").textContent = format.percent(system.cpu_usage);
  $("system-connections").textContent = String(system.connections);
  // system_status comes once a heartbeat (30 s by default); the job counts
  // follow the live job messages instead, and the uptime ticks here.
  const jobs = [...state.jobs.values()];
  const active = jobs.filter((job) => ACTIVE.has(job.state)).length;
  const queued = jobs.filter((job) => job.state === "queued").length;
  $("system-jobs").textContent = `${active} active, ${queued} queued`;
  renderUptime();
}

function renderUptime() {
  if (state.system && state.live) {
    const since = (Date.now() - state.systemReceived) / 1000;
    $("system-uptime").textContent = format.duration(state.system.uptime + since);
  }
}

function renderDevice() {
  const device = state.device;
  if (!device) {
    return;
  }
  setBadge($("device-badge"), device.status);
  $("device-port").textContent = device.port || "–";
  $("device-firmware").textContent = device.firmware_version || "–";
  $("device-pen").textContent = device.pen || "–";
  $("device-position").textContent = format.millimetres(device.position_mm);
  preview.setPen(device.position_mm, device.pen);
}

// The job to show: the one holding the plotter; else the one shown before,
// so a finished drawing stays in view until the next one starts.
function currentJob() {
  const deviceJob = state.device && state.jobs.get(state.device.current_job_id);
  if (deviceJob && ACTIVE.has(deviceJob.state)) {
    return deviceJob;
  }
  for (const job of state.jobs.values()) {
    if (ACTIVE.has(job.state)) {
      return job;
    }
  }
  // An interrupted job holds the queue until someone resumes or cancels it.
  for (const job of state.jobs.values()) {
    if (job.state === "interrupted") {
      return job;
    }
  }
  return state.jobs.get(state.currentId) || null;
}

function renderCurrent() {
  const job = currentJob();
  state.currentId = job ? job.id : null;
  const badge = $("current-badge");
  badge.hidden = !job;
  if (!job) {
    $("current-title").textContent = "Now plotting";
    $("current-name").textContent = "Nothing is plotting.";
    $("current-error").hidden = true;
    $("pen-prompt").hidden = true;
    $("current-actions").replaceChildren();
    delete $("current-actions").dataset.for;
    showProgress(null, null);
    showPreview(null);
    return;
  }
  const holding = job.state === "interrupted";
  $("current-title").textContent = ACTIVE.has(job.state) ? "Now plotting"
    : holding ? "Holding the queue" : "Last job";
  $("current-name").textContent = job.name;
  const error = holding
    ? `${job.error || "interrupted"}. The queue waits for this job: resume or cancel it.`
    : job.error;
  $("current-error").hidden = !error;
  $("current-error").textContent = error || "";
  setBadge(badge, job.state);

  const awaitingPen = job.state === "awaiting_pen";
  $("pen-prompt").hidden = !awaitingPen;
  if (awaitingPen) {
    $("pen-reason").textContent = state.reasons.get(job.id)
      || "put in the pen for the next layer, then continue.";
    $("pen-ready").dataset.jobId = job.id;
  }
  // While a pen change waits, the prompt's own button is the way to resume.
  updateActions($("current-actions"), job, awaitingPen ? ["cancel"] : null);
  showProgress(job, state.progress.get(job.id));
  showPreview(job);
}

/** The estimate as it will really take on this plotter (the virtual one may run
 * faster than an AxiDraw), with the AxiDraw's time beside it where they differ. */
function estimate(seconds) {
  const speed = (state.device && state.device.simulator_speed) || 1;
  if (speed === 1 || seconds == null) return format.duration(seconds);
  return `${format.duration(seconds / speed)} here, ${format.duration(seconds)} on an AxiDraw`;
}

/** The time left here (job_progress eta_seconds), and an AxiDraw's where it differs. */
function timeLeft(seconds) {
  const speed = (state.device && state.device.simulator_speed) || 1;
  if (speed === 1 || seconds == null) return `${format.duration(seconds)} left`;
  return `${format.duration(seconds)} left (${format.duration(seconds * speed)} on an AxiDraw)`;
}

function showProgress(job, message) {
  $("progress").hidden = !job;
  const progress = message ? message.progress : job ? job.progress || 0 : 0;
  $("progress-fill").style.width = `${Math.round(progress * 1000) / 10}%`;
  $("progress-percent").textContent = job ? format.percent(progress) : "";
  const layers = message && message.total_layers > 1
    ? `layer ${message.current_layer} of ${message.total_layers}` : "";
  $("progress-layer").textContent = layers;
  let eta = "";
  if (job && message && ACTIVE.has(job.state)) {
    eta = timeLeft(message.eta_seconds);
  } else if (job && job.state === "queued") {
    eta = `about ${estimate(job.estimated_seconds)}`;
  }
  $("progress-eta").textContent = eta;
  preview.setProgress(progress);
}

function showPreview(job) {
  const id = job ? job.id : null;
  $("preview-empty").hidden = Boolean(id);
  if (id === previewShown) {
    return;
  }
  previewShown = id;
  if (!id) {
    preview.setDrawing(null);
    return;
  }
  if (previews.has(id)) {
    preview.setDrawing(previews.get(id));
    return;
  }
  preview.setDrawing(null);
  api.preview(id).then((document) => {
    previews.set(id, document);
    if (previewShown === id) {
      preview.setDrawing(document);
    }
  }, (error) => {
    if (previewShown === id) {
      previewShown = null;  // try again on the next update
      $("preview-empty").hidden = false;
      $("preview-empty").textContent = `No preview: ${error.message}`;
    }
  });
}

// The queue: what holds the plotter, then the queue in run order, then what
// was interrupted, then finished jobs newest first.
function orderedJobs() {
  const jobs = [...state.jobs.values()];
  const rank = (job) => ACTIVE.has(job.state) ? 0 : job.state === "queued" ? 1
    : job.state === "interrupted" ? 2 : 3;
  const byCreated = (a, b) => String(a.created_at).localeCompare(String(b.created_at));
  jobs.sort((a, b) => rank(a) - rank(b)
    || (rank(a) === 1 ? (b.priority - a.priority) || byCreated(a, b) : byCreated(b, a)));
  const finished = jobs.filter((job) => FINISHED.has(job.state)).slice(0, FINISHED_SHOWN);
  return jobs.filter((job) => !FINISHED.has(job.state)).concat(finished);
}

// Rows are kept and updated in place: progress arrives up to ten times a
// second, and rebuilding a row under the pointer would swallow a click.
const rows = new Map();  // id -> <tr>

function renderJobs() {
  const body = $("jobs");
  const jobs = orderedJobs();
  const shown = new Set(jobs.map((job) => job.id));
  for (const [id, row] of rows) {
    if (!shown.has(id)) {
      row.remove();
      rows.delete(id);
    }
  }
  jobs.forEach((job, index) => {
    let row = rows.get(job.id);
    if (!row) {
      row = newRow(job.id);
      rows.set(job.id, row);
    }
    fillRow(row, job);
    if (body.children[index] !== row) {
      body.insertBefore(row, body.children[index] || null);
    }
  });
  $("jobs-empty").hidden = jobs.length > 0;
  $("jobs-table").hidden = jobs.length === 0;
}

function newRow(id) {
  const row = document.createElement("tr");
  row.dataset.jobId = id;
  row.innerHTML = `
    <td class="col-state"><span class="badge"></span></td>
    <td class="col-name"><span class="job-name"></span> <code class="job-id"></code></td>
    <td class="col-submitted"><time></time></td>
    <td class="col-estimate"></td>
    <td class="col-progress"><div class="mini-track"><div class="mini-fill"></div></div>
      <span class="mini-figure"></span></td>
    <td class="col-actions"><div class="actions"></div></td>`;
  return row;
}

function fillRow(row, job) {
  setBadge(row.querySelector(".badge"), job.state);
  const name = row.querySelector(".col-name");
  name.querySelector(".job-name").textContent = job.name;
  // The id as far as it tells jobs apart (the CLI takes any unique prefix).
  name.querySelector(".job-id").textContent = job.id.slice(0, 8);
  name.title = job.error ? `${job.id}: ${job.error}` : job.id;
  // The daemon's first paint names its own zone; the browser's is the reader's.
  const submitted = row.querySelector(".col-submitted time");
  submitted.dateTime = job.created_at || "";
  submitted.textContent = format.clock(job.created_at);
  const took = job.finished_at ? format.secondsBetween(job.started_at, job.finished_at) : null;
  row.querySelector(".col-estimate").textContent = took !== null
    ? `took ${format.duration(took)}` : estimate(job.estimated_seconds);
  const progress = Number(job.progress) || 0;
  row.querySelector(".mini-fill").style.width = `${Math.round(progress * 1000) / 10}%`;
  row.querySelector(".mini-figure").textContent = format.percent(progress);
  updateActions(row.querySelector(".actions"), job);
}

// Rebuilds the buttons only when the state changed (see `rows` above).
function updateActions(container, job, only = null) {
  const key = `${job.id}:${job.state}`;
  if (container.dataset.for === key) {
    return;
  }
  container.dataset.for = key;
  const actions = (ACTIONS[job.state] || []).filter((action) => !only || only.includes(action));
  container.replaceChildren(...actions.map((action) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = `button ${action === "cancel" ? "quiet" : ""}`;
    button.dataset.action = action;
    button.dataset.jobId = job.id;
    button.textContent = ACTION_LABELS[action];
    return button;
  }));
}

// -- operator actions -----------------------------------------------------------

async function jobAction(button, jobId, action) {
  if (action === "cancel") {
    const job = state.jobs.get(jobId);
    if (!window.confirm(`Cancel “${job ? job.name : jobId}”?`)) {
      return;
    }
  }
  button.disabled = true;
  const news = state.jobNews;
  try {
    const job = await api.jobAction(jobId, action);
    // The WebSocket tells the same, but this makes the click show at once;
    // unless the WebSocket has spoken since, when the answer may be older.
    if (state.jobNews === news) {
      state.jobs.set(job.id, job);
      render();
    }
  } catch (error) {
    showAlert("warning", `Could not ${action} the job`, error.message);
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (button) {
    jobAction(button, button.dataset.jobId, button.dataset.action);
  }
});

$("pen-ready").addEventListener("click", (event) => {
  jobAction(event.currentTarget, event.currentTarget.dataset.jobId, "resume");
});

async function upload(file) {
  const message = $("upload-message");
  message.dataset.kind = "busy";
  message.textContent = `Uploading ${file.name}…`;
  try {
    const job = await api.submit(file);
    // The job may already have started: then the WebSocket's word is newer
    // than this answer's "queued".
    if (!state.jobs.has(job.id)) {
      state.jobs.set(job.id, job);
      render();
    }
    message.dataset.kind = "ok";
    message.textContent = `Queued “${job.name}” (about ${estimate(job.estimated_seconds)}).`;
  } catch (error) {
    message.dataset.kind = "error";
    const status = error instanceof ApiError && error.status ? ` (${error.status})` : "";
    message.textContent = `${file.name} was not queued${status}: ${error.message}`;
  }
}

$("upload-input").addEventListener("change", (event) => {
  const file = event.target.files[0];
  event.target.value = "";  // choosing the same file again is a new upload
  if (file) {
    upload(file);
  }
});

const dropzone = $("dropzone");
dropzone.addEventListener("dragover", (event) => {
  event.preventDefault();
  dropzone.classList.add("over");
});
dropzone.addEventListener("dragleave", () => dropzone.classList.remove("over"));
dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropzone.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) {
    upload(file);
  }
});
// A file dropped beside the zone would make the browser leave the dashboard.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

// -- alerts ---------------------------------------------------------------------------

function showAlert(severity, title, text) {
  const alert = document.createElement("div");
  alert.className = "alert";
  alert.dataset.severity = severity || "info";
  alert.setAttribute("role", severity === "error" || severity === "critical" ? "alert" : "status");
  const heading = document.createElement("strong");
  heading.textContent = title || "Notice";
  const body = document.createElement("span");
  body.textContent = text || "";
  const close = document.createElement("button");
  close.type = "button";
  close.className = "alert-close";
  close.setAttribute("aria-label", "Dismiss");
  close.textContent = "×";
  close.addEventListener("click", () => alert.remove());
  alert.append(heading, body, close);
  $("alerts").prepend(alert);
  // Information fades away; warnings and errors stay until dismissed.
  const seconds = ALERT_SECONDS[severity];
  if (seconds) {
    setTimeout(() => alert.remove(), seconds * 1000);
  }
}

// -- the API key ---------------------------------------------------------------------

function askForKey(reason) {
  const dialog = $("key-dialog");
  $("key-why").textContent = api.key
    ? `The daemon refused the key: ${reason}. Enter the right one.`
    : "This daemon needs its API key (websocket.api_key in its configuration).";
  if (!dialog.open) {
    dialog.showModal();
  }
}

$("key-form").addEventListener("submit", () => {
  api.setKey($("key-input").value.trim());
  $("key-input").value = "";
  stream.connect();
});

api.onUnauthorized = (error) => {
  stream.lock(error.message);
};

// -- the first paint -------------------------------------------------------------------

// The daemon renders index.html with the snapshot a new WebSocket subscriber
// gets (vfab/web/dashboard.py), and puts that snapshot beside it as JSON: the
// state starts from it and the rows it rendered become this module's rows, so
// that live updates change them in place. With the API key required the page
// holds no data and no snapshot.
function takeOver() {
  const element = $("first-paint");
  if (!element) {
    return;
  }
  const snapshot = JSON.parse(element.textContent);
  state.jobs = new Map(snapshot.jobs.map((job) => [job.id, job]));
  state.jobsKnown = true;
  state.device = snapshot.device;
  for (const status of snapshot.plotters || []) {
    plotters.update(status);
  }
  state.system = snapshot.system;
  state.systemReceived = Date.now();
  for (const row of $("jobs").querySelectorAll("tr[data-job-id]")) {
    rows.set(row.dataset.jobId, row);
  }
}

// -- the connection -------------------------------------------------------------------

function showLink(linkState, detail) {
  state.live = linkState === "live";
  const element = $("link-state");
  element.dataset.state = linkState;
  element.textContent = {
    connecting: "connecting…",
    live: "live",
    waiting: `reconnecting in ${detail} s`,
    locked: "API key needed",
  }[linkState];
}

const stream = new Stream(() => api.key, {
  onMessage: handle,
  onState: showLink,
  onAuthRequired: askForKey,
  // A 401 here calls api.onUnauthorized, which locks the stream and asks for
  // the key; any other answer leaves the stream to try again.
  onRefused: () => api.request("GET", "/api/device").catch(() => {}),
});
takeOver();
stream.connect();
render();
setInterval(renderUptime, 1000);
