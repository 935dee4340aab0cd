// A token x layer heatmap drawn as a CSS grid: one cell element per (layer, token), each with
// its value in data-value and a tooltip, so it can be read, hovered and tested like any page.

// viridis at five stops (matplotlib's colormap, sampled at 0, 0.25, 0.5, 0.75, 1).
const SEQUENTIAL = [
  [68, 1, 84],
  [59, 82, 139],
  [33, 145, 140],
  [94, 201, 98],
  [253, 231, 37],
];
const DIVERGING = [
  [49, 54, 149],
  [247, 247, 247],
  [165, 0, 38],
];

function ramp(stops, t) {
  const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
  const i = Math.min(Math.floor(x), stops.length - 2);
  const f = x - i;
  const mix = (channel) => Math.round(stops[i][channel] + f * (stops[i + 1][channel] - stops[i][channel]));
  return `rgb(${mix(0)}, ${mix(1)}, ${mix(2)})`;
}

// t in [0, 1]; diverging: 0.5 is the middle (white).
export function colour(t, diverging) {
  return ramp(diverging ? DIVERGING : SEQUENTIAL, t);
}

// A token as a label: line breaks and tabs drawn, a token of spaces shown as such.
export function visible(token) {
  const drawn = String(token).replaceAll("\n", "↵").replaceAll("\t", "→");
  return drawn.trim() === "" ? drawn.replaceAll(" ", "␣") || "∅" : drawn;
}

// A light shade of one hue for t in [0, 1], dark enough to see, light enough to read text on.
export function shade(t, hue) {
  return `hsl(${hue}, 80%, ${Math.round(100 - 42 * Math.min(Math.max(t, 0), 1))}%)`;
}

// The value at quantile q (0..1) of a sorted array.
function quantile(sorted, q) {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * (sorted.length - 1)))];
}

// values[layer][position]; rows are layers (the last layer on top), columns tokens.
// Colours: sequential from the lowest value to the 95th percentile of a scope (each layer, or
// the whole map), so that one outlier (the first token's huge norm, an attention sink) does
// not flatten the rest; diverging (white at 0) symmetric around 0 at the 95th percentile of |v|.
export function drawHeatmap(container, tokens, values, { diverging, what, perLayer }) {
  const scopes = perLayer ? values : [values.flatMap((row) => Array.from(row))];
  const ranges = scopes.map((scope) => {
    const sorted = Array.from(scope, (value) => (diverging ? Math.abs(value) : value)).sort((a, b) => a - b);
    return { low: diverging ? 0 : sorted[0], high: quantile(sorted, 0.95) || 1 };
  });
  const rangeOf = (layer) => ranges[perLayer ? layer : 0];
  const scaled = (value, { low, high }) =>
    diverging ? 0.5 + value / (2 * high) : (value - low) / (high - low || 1);
  container.textContent = "";
  container.style.gridTemplateColumns = `max-content repeat(${tokens.length}, minmax(1.1em, 1fr))`;
  for (let layer = values.length - 1; layer >= 0; layer--) {
    container.append(Object.assign(document.createElement("div"), { className: "label", textContent: layer }));
    values[layer].forEach((value, position) => {
      const cell = document.createElement("div");
      cell.className = "cell";
      cell.dataset.layer = layer;
      cell.dataset.position = position;
      cell.dataset.value = value;
      cell.title = `layer ${layer}, token ${position} ${JSON.stringify(tokens[position])}: ${what} = ${value.toFixed(3)}`;
      cell.style.background = colour(scaled(value, rangeOf(layer)), diverging);
      container.append(cell);
    });
  }
  container.append(Object.assign(document.createElement("div"), { className: "label" }));
  for (const token of tokens) {
    container.append(Object.assign(document.createElement("div"), { className: "label token", textContent: visible(token) }));
  }
  let low = Infinity;
  let high = -Infinity;
  for (const row of values) {
    for (const value of row) {
      if (value < low) low = value;
      if (value > high) high = value;
    }
  }
  return { low, high };
}
