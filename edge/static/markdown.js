// A small, safe Markdown renderer for model output.
//
// Safety by construction: it builds DOM nodes with createElement and text nodes, and never
// assigns HTML (no HTML string is ever parsed), so whatever the model writes - <script>, <img
// onerror=...>, entities - is shown as text. Links are made only for http: and https: URLs
// (javascript:, data: and the rest stay text), and open with rel="noopener noreferrer".
//
// Blocks: ``` fenced code (an unclosed fence runs to the end: a streaming answer is
// rendered as it grows), # headings, - / * / 1. lists, > quotes, paragraphs.
// Inline: `code`, **bold**, *italic* / _italic_, [text](http(s)://...), bare http(s) URLs.

export function renderMarkdown(text) {
  const root = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)/);
    if (fence) {
      const code = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
      i++; // the closing fence (or past the end)
      const pre = el("pre");
      const c = el("code");
      if (fence[1]) c.dataset.lang = fence[1];
      c.textContent = code.join("\n");
      pre.append(c);
      root.append(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      const h = el("h" + Math.min(6, heading[1].length + 2)); // h3..h6: inside a chat bubble
      inline(h, heading[2]);
      root.append(h);
      i++;
      continue;
    }
    if (/^\s*([-*+]|\d+[.)])\s+/.test(line)) {
      const ordered = /^\s*\d+[.)]\s+/.test(line);
      const list = el(ordered ? "ol" : "ul");
      const item = ordered ? /^\s*\d+[.)]\s+(.*)$/ : /^\s*[-*+]\s+(.*)$/;
      while (i < lines.length && item.test(lines[i])) {
        const li = el("li");
        inline(li, lines[i].match(item)[1]);
        list.append(li);
        i++;
      }
      root.append(list);
      continue;
    }
    if (/^>\s?/.test(line)) {
      const quote = el("blockquote");
      const body = [];
      while (i < lines.length && /^>\s?/.test(lines[i])) body.push(lines[i++].replace(/^>\s?/, ""));
      inline(quote, body.join("\n"));
      root.append(quote);
      continue;
    }
    if (line.trim() === "") {
      i++;
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() !== "" && !startsBlock(lines[i])) para.push(lines[i++]);
    const p = el("p");
    inline(p, para.join("\n"));
    root.append(p);
  }
  return root;
}

function startsBlock(line) {
  return /^\s*```/.test(line) || /^#{1,6}\s/.test(line) || /^\s*([-*+]|\d+[.)])\s+/.test(line) || /^>/.test(line);
}

function el(tag) {
  return document.createElement(tag);
}

// One pass over the text, longest construct first; anything unmatched is plain text.
const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([\s\S]+?)\*\*|\*([^*\s][^*]*?)\*|\b_([^_\s][^_]*?)_\b|\[([^\]\n]+)\]\(([^)\s]+)\)|(https?:\/\/[^\s<>()]+[^\s<>().,;:!?'"])/g;

export function inline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) addText(parent, text.slice(last, m.index));
    if (m[1]) {
      const c = el("code");
      c.textContent = m[2];
      parent.append(c);
    } else if (m[3] !== undefined) {
      const b = el("strong");
      inline(b, m[3]);
      parent.append(b);
    } else if (m[4] !== undefined || m[5] !== undefined) {
      const e = el("em");
      inline(e, m[4] !== undefined ? m[4] : m[5]);
      parent.append(e);
    } else if (m[6] !== undefined) {
      const href = safeUrl(m[7]);
      if (href) {
        parent.append(link(href, m[6]));
      } else {
        addText(parent, m[0]); // not a link we make: the reader sees exactly what was written
      }
    } else if (m[8] !== undefined) {
      parent.append(link(m[8], m[8]));
    }
    last = m.index + m[0].length;
  }
  if (last < text.length) addText(parent, text.slice(last));
}

function addText(parent, text) {
  const parts = text.split("\n");
  parts.forEach((part, n) => {
    if (n > 0) parent.append(el("br"));
    if (part) parent.append(document.createTextNode(part));
  });
}

function link(href, label) {
  const a = el("a");
  a.href = href;
  a.rel = "noopener noreferrer";
  a.target = "_blank";
  a.textContent = label;
  return a;
}

// Only absolute http(s) URLs; parsed, so tricks like "java\tscript:" or entities fail.
export function safeUrl(raw) {
  try {
    const url = new URL(raw);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}
