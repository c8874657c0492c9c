// The plotters of a daemon with several (`plotters:` in its configuration): one
// row each, from their device_status messages. With one plotter the list stays
// hidden: the "Plotter" card shows it. The card is in index.html, where the
// first paint (vfab/web/dashboard.py) may already have filled it with these rows.

export class PlotterList {
  constructor(card, stateLabel) {
    this.statuses = new Map();  // plotter name -> its last device_status
    this.stateLabel = stateLabel;
    this.card = card;
    this.rows = card.querySelector("tbody");
  }

  update(status) {
    this.statuses.set(status.plotter, status);
    this.card.hidden = this.statuses.size < 2;
    this.rows.replaceChildren(...[...this.statuses.values()].map((plotter) => {
      const row = document.createElement("tr");
      row.dataset.plotter = plotter.plotter;
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.dataset.state = plotter.status || "unknown";
      badge.textContent = this.stateLabel(plotter.status);
      const cells = [plotter.plotter, badge, (plotter.tags || []).join(", ") || "–",
                     plotter.current_job_id || "–"];
      for (const content of cells) {
        const cell = document.createElement("td");
        cell.append(content);
        row.appendChild(cell);
      }
      return row;
    }));
  }
}
