// The live preview: the whole drawing faint, what is plotted dark, the pen a dot.
//
// The preview's paths come in plot order, so "what is plotted" is the first
// `progress` of the total pen-down length. The daemon measures progress in
// drawing time, which follows length closely enough for a picture.

const PAGE = "#ffffff";
const PAGE_EDGE = "#d5d9de";
const TODO_INK = "#c9ced6";
const DONE_INK = "#1d2733";
const PEN = "#d9480f";
const MARGIN_PX = 12;

export class Preview {
  constructor(canvas) {
    this.canvas = canvas;
    this.drawing = null;   // {width_mm, height_mm, paths: [{points, length}], total}
    this.progress = 0;
    this.pen = null;       // {x, y, down}
    this.pending = false;
    // Redraw when the canvas changes size (phone rotation, window resize).
    new ResizeObserver(() => this.redraw()).observe(canvas);
  }

  // document: GET /api/jobs/{id}/preview, or null for no drawing.
  setDrawing(document) {
    this.drawing = document ? measure(document) : null;
    this.redraw();
  }

  setProgress(progress) {
    this.progress = Math.min(1, Math.max(0, Number(progress) || 0));
    this.redraw();
  }

  setPen(positionMm, pen) {
    this.pen = Array.isArray(positionMm) && positionMm.length === 2
      ? { x: Number(positionMm[0]), y: Number(positionMm[1]), down: pen === "down" }
      : null;
    this.redraw();
  }

  // Progress messages come up to ten a second; paint at most once a frame.
  redraw() {
    if (this.pending) {
      return;
    }
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.paint();
    });
  }

  paint() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const cssWidth = canvas.clientWidth;
    const drawing = this.drawing;
    // The canvas keeps the page's aspect ratio; its width is the layout's.
    // Without a drawing a low placeholder is enough.
    const aspect = drawing ? drawing.height_mm / drawing.width_mm : 0.4;
    const cssHeight = Math.max(120, Math.round(cssWidth * aspect));
    canvas.style.height = `${cssHeight}px`;
    canvas.width = Math.round(cssWidth * ratio);
    canvas.height = Math.round(cssHeight * ratio);
    const context = canvas.getContext("2d");
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    context.clearRect(0, 0, cssWidth, cssHeight);
    canvas.dataset.drawn = "0";
    if (!drawing) {
      return;
    }

    const scale = Math.min((cssWidth - 2 * MARGIN_PX) / drawing.width_mm,
      (cssHeight - 2 * MARGIN_PX) / drawing.height_mm);
    const left = (cssWidth - drawing.width_mm * scale) / 2;
    const top = (cssHeight - drawing.height_mm * scale) / 2;
    const toPx = ([x, y]) => [left + x * scale, top + y * scale];

    context.fillStyle = PAGE;
    context.strokeStyle = PAGE_EDGE;
    context.lineWidth = 1;
    context.fillRect(left, top, drawing.width_mm * scale, drawing.height_mm * scale);
    context.strokeRect(left + 0.5, top + 0.5, drawing.width_mm * scale - 1,
      drawing.height_mm * scale - 1);

    context.lineJoin = "round";
    context.lineCap = "round";
    context.lineWidth = Math.max(1, 0.35 * scale);  // about a fine pen's width
    strokeAll(context, drawing.paths, toPx, TODO_INK);
    const drawn = strokeUpTo(context, drawing, this.progress * drawing.total, toPx, DONE_INK);
    canvas.dataset.drawn = String(drawn);

    if (this.pen) {
      const [x, y] = toPx([this.pen.x, this.pen.y]);
      context.beginPath();
      context.arc(x, y, 5, 0, 2 * Math.PI);
      context.lineWidth = 2;
      context.strokeStyle = PEN;
      context.fillStyle = this.pen.down ? PEN : PAGE;
      context.fill();
      context.stroke();
    }
  }
}

function measure(document) {
  const paths = [];
  let total = 0;
  for (const layer of document.layers || []) {
    for (const points of layer.paths || []) {
      let length = 0;
      for (let i = 1; i < points.length; i += 1) {
        length += Math.hypot(points[i][0] - points[i - 1][0], points[i][1] - points[i - 1][1]);
      }
      paths.push({ points, length });
      total += length;
    }
  }
  return {
    width_mm: Number(document.width_mm) || 1,
    height_mm: Number(document.height_mm) || 1,
    paths,
    total,
  };
}

function strokeAll(context, paths, toPx, colour) {
  context.strokeStyle = colour;
  context.beginPath();
  for (const path of paths) {
    path.points.forEach((point, i) => {
      const [x, y] = toPx(point);
      if (i === 0) {
        context.moveTo(x, y);
      } else {
        context.lineTo(x, y);
      }
    });
  }
  context.stroke();
}

// Strokes the paths in order until `budget` millimetres are used, cutting the
// last segment part-way; returns how many millimetres it drew.
function strokeUpTo(context, drawing, budget, toPx, colour) {
  let left = budget;
  context.strokeStyle = colour;
  context.beginPath();
  for (const path of drawing.paths) {
    if (left <= 0) {
      break;
    }
    const points = path.points;
    context.moveTo(...toPx(points[0]));
    for (let i = 1; i < points.length && left > 0; i += 1) {
      const [x0, y0] = points[i - 1];
      const [x1, y1] = points[i];
      const step = Math.hypot(x1 - x0, y1 - y0);
      if (step <= left) {
        context.lineTo(...toPx(points[i]));
        left -= step;
      } else {
        const t = left / step;
        context.lineTo(...toPx([x0 + (x1 - x0) * t, y0 + (y1 - y0) * t]));
        left = 0;
      }
    }
  }
  context.stroke();
  return Math.round((budget - left) * 10) / 10;
}
