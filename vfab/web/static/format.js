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
