// How figures read on the dashboard.

// 42 -> "42 s", 200 -> "3 min 20 s", 3900 -> "1 h 05 min".
export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(Number(seconds))) {
    return "–";
  }
  const total = Math.max(0, Math.round(Number(seconds)));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const secs = total % 60;
  if (hours > 0) {
    return `${hours} h ${String(minutes).padStart(2, "0")} min`;
  }
  if (minutes > 0) {
    return `${minutes} min ${String(secs).padStart(2, "0")} s`;
  }
  return `${secs} s`;
}

// 0.4567 -> "46 %"
export function percent(fraction) {
  const value = Number(fraction);
  return Number.isFinite(value) ? `${Math.round(value * 100)} %` : "–";
}

// "awaiting_pen" -> "awaiting pen"
export function stateLabel(state) {
  return String(state || "unknown").replace(/_/g, " ");
}

export function millimetres(point) {
  if (!Array.isArray(point) || point.length !== 2) {
    return "–";
  }
  return `${Number(point[0]).toFixed(1)}, ${Number(point[1]).toFixed(1)} mm`;
}

// An ISO 8601 time as people read it here: "14:05" today, "6 Dec 14:05" before.
export function clock(iso, now = new Date()) {
  const when = iso ? new Date(iso) : null;
  if (!when || Number.isNaN(when.getTime())) {
    return "–";
  }
  const time = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (when.toDateString() === now.toDateString()) {
    return time;
  }
  return `${when.toLocaleDateString([], { day: "numeric", month: "short" })} ${time}`;
}

// Seconds between two ISO 8601 times, or null when either is missing.
export function secondsBetween(start, end) {
  const seconds = (new Date(end) - new Date(start)) / 1000;
  return start && end && Number.isFinite(seconds) ? seconds : null;
}
