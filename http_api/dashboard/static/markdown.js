// Markdown into DOM nodes, safe by construction: text only ever becomes a text node
// (never HTML), and a link only keeps an http(s) or mailto address. Covers what chat
// answers use: paragraphs, headings, lists, quotes, fenced code, and inline code,
// bold, italic and links.

// Groups: code (1, 2), bold (3, 4), italic (5, 6), link (7, 8).
const INLINE = new RegExp([
  /(`+)([\s\S]*?[^`])\1(?!`)/.source,
  /\*\*(\S[\s\S]*?)\*\*|__(\S[\s\S]*?)__/.source,
  /\*(\S[^*]*?)\*|\b_(\S[^_]*?)_\b/.source,
  /\[([^\]\n]+)\]\(([^)\s]+)\)/.source,
].join("|"), "g");
const SAFE_URL = /^(https?:|mailto:)/i;

function el(tag, children = []) {
  const node = document.createElement(tag);
  node.append(...children);
  return node;
}

// Inline marks of one piece of text, as a list of nodes.
export function inline(text) {
  const nodes = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) nodes.push(document.createTextNode(text.slice(last, m.index)));
    last = m.index + m[0].length;
    if (m[1]) nodes.push(el("code", [document.createTextNode(m[2])]));
    else if (m[3] || m[4]) nodes.push(el("strong", inline(m[3] || m[4])));
    else if (m[5] || m[6]) nodes.push(el("em", inline(m[5] || m[6])));
    else if (SAFE_URL.test(m[8])) {
      const link = el("a", inline(m[7]));
      link.href = m[8];
      link.rel = "noopener noreferrer";
      link.target = "_blank";
      nodes.push(link);
    } else nodes.push(document.createTextNode(m[0]));
  }
  if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

function withBreaks(lines) {
  const nodes = [];
  lines.forEach((line, i) => {
    if (i) nodes.push(el("br"));
    nodes.push(...inline(line));
  });
  return nodes;
}

const LIST_ITEM = /^\s*([-*+]|\d+[.)])\s+(.*)$/;

// The blocks of `text` as DOM nodes; an unclosed code fence (a streaming answer) runs to the end.
export function renderMarkdown(text) {
  const lines = text.split("\n");
  const blocks = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```|~~~)\s*([\w+-]*)/);
    if (fence) {
      const code = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) code.push(lines[i]);
      i++;
      const codeNode = el("code", [document.createTextNode(code.join("\n"))]);
      if (fence[2]) codeNode.dataset.language = fence[2];
      blocks.push(el("pre", [codeNode]));
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      blocks.push(el(`h${Math.min(heading[1].length + 2, 6)}`, inline(heading[2])));
      i++;
      continue;
    }
    const item = line.match(LIST_ITEM);
    if (item) {
      const list = el(/\d/.test(item[1]) ? "ol" : "ul");
      while (i < lines.length && LIST_ITEM.test(lines[i])) {
        list.append(el("li", inline(lines[i].match(LIST_ITEM)[2])));
        i++;
      }
      blocks.push(list);
      continue;
    }
    if (line.startsWith(">")) {
      const quoted = [];
      for (; i < lines.length && lines[i].startsWith(">"); i++) quoted.push(lines[i].replace(/^>\s?/, ""));
      blocks.push(el("blockquote", renderMarkdown(quoted.join("\n"))));
      continue;
    }
    if (!line.trim()) {
      i++;
      continue;
    }
    const paragraph = [];
    for (; i < lines.length && lines[i].trim() && !/^(\s*(```|~~~)|#{1,6}\s|>)/.test(lines[i])
      && !LIST_ITEM.test(lines[i]); i++) paragraph.push(lines[i]);
    blocks.push(el("p", withBreaks(paragraph)));
  }
  return blocks;
}
