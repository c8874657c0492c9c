// The plotters of a daemon with several (`plotters:` in its configuration): one
// row each, from their device_status messages. With one plotter the list stays
// hidden: the "Plotter" card shows it.

export class PlotterList {
  constructor(parent, stateLabel) {
    this.statuses = new Map();  // plotter name -> its last device_status
    this.stateLabel = stateLabel;
    this.card = document.createElement("section");
    this.card.className = "card plotters";
    this.card.id = "plotters";
    this.card.hidden = true;
    this.card.setAttribute("aria-labelledby", "plotters-title");
    this.card.innerHTML = `<h2 id="plotters-title">Plotters</h2>
      <table class="jobs"><thead><tr><th>Plotter</th><th>State</th><th>Tags</th>
      <th>Job</th></tr></thead><tbody id="plotters-rows"></tbody></table>`;
    this.rows = this.card.querySelector("tbody");
    parent.appendChild(this.card);
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
