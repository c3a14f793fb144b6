/**
 * NexCompute inside Jupyter Lab: the machine and the time left in the status bar, the lease
 * warnings with Extend and "Save all and download workspace", every open document saved when
 * the session stops, and a plain "This session has ended" at the end.
 *
 * It talks only to its own Jupyter server (the nexcompute_jupyter server extension under
 * /nexcompute/api/), which holds the session-scoped capability and asks the Nexus.
 */
import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Widget } from '@lumino/widgets';

const POLL_MS = 2000;
const ACTIVITY_THROTTLE_MS = 30000;
const FRESH_WARNING_MS = 15 * 60 * 1000;

interface Lease {
  session_id: number;
  state: string;
  machine: { id: number; name: string };
  expires_at: string;
  now: string;
  warnings: { at: string; message: string }[];
  extend: {
    default_minutes: number | null;
    choices_minutes: number[];
    reason: string;
  };
}

interface LeaseAnswer {
  session_id: number;
  lease: Lease | null;
  error: string | null;
  stopping: boolean;
  ended: boolean;
}

function left(ms: number): string {
  if (ms <= 0) {
    return 'time is up';
  }
  const s = Math.floor(ms / 1000);
  if (s < 60) {
    return `${s} s left`;
  }
  const m = Math.ceil(s / 60);
  if (m < 60) {
    return `${m} min left`;
  }
  const h = Math.floor(m / 60);
  const rest = m % 60;
  return rest ? `${h} h ${rest} min left` : `${h} h left`;
}

function clock(iso: string): string {
  return new Date(iso).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

class NexCompute {
  private lease: Lease | null = null;
  private offset = 0; // the Nexus's clock minus ours
  private stopping = false;
  private ended = false;
  private savedForStop = false;
  private failures = 0;
  private lastActivity = 0;
  private seen = new Set<string>();
  private loadedAt = Date.now();
  private banner: HTMLElement | null = null;
  private readonly settings: ServerConnection.ISettings;
  readonly status = new Widget();
  private readonly text: HTMLElement;

  constructor(private readonly app: JupyterFrontEnd) {
    this.settings = app.serviceManager.serverSettings;
    this.text = document.createElement('span');
    this.text.setAttribute('data-nexcompute-time-left', '');
    this.text.className = 'nexcompute-time-left';
    this.text.textContent = 'NexCompute…';
    this.status.node.appendChild(this.text);
    this.status.addClass('nexcompute-status');
    try {
      const raw = sessionStorage.getItem('nexcompute-seen-warnings');
      if (raw) {
        this.seen = new Set(JSON.parse(raw) as string[]);
      }
    } catch {
      // a browser without sessionStorage shows a warning again after a reload
    }
  }

  start(): void {
    void this.poll();
    window.setInterval(() => void this.poll(), POLL_MS);
    window.setInterval(() => this.render(), 1000);
    const interacted = (): void => this.interacted();
    document.addEventListener('keydown', interacted, true);
    document.addEventListener('pointerdown', interacted, true);
  }

  private url(name: string): string {
    return URLExt.join(this.settings.baseUrl, 'nexcompute/api', name);
  }

  private async call(
    name: string,
    method = 'GET',
    body?: unknown
  ): Promise<Response> {
    const init: RequestInit = { method };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers = { 'Content-Type': 'application/json' };
    }
    return ServerConnection.makeRequest(this.url(name), init, this.settings);
  }

  /** A key press or click of the user's own (never our polling): at most one report per 30 s. */
  private interacted(): void {
    const now = Date.now();
    if (now - this.lastActivity < ACTIVITY_THROTTLE_MS || this.ended) {
      return;
    }
    this.lastActivity = now;
    void this.call('activity', 'POST').catch(() => undefined);
  }

  private async poll(): Promise<void> {
    if (this.ended) {
      return;
    }
    let answer: LeaseAnswer;
    try {
      const resp = await this.call('lease');
      if (!resp.ok) {
        throw new Error(`HTTP ${resp.status}`);
      }
      answer = (await resp.json()) as LeaseAnswer;
      this.failures = 0;
    } catch {
      this.failures += 1;
      // Jupyter is gone: after the stop (or past the lease) that is the end, not "Connecting".
      const expired =
        this.lease !== null &&
        Date.parse(this.lease.expires_at) <= Date.now() + this.offset + POLL_MS;
      if ((this.stopping || expired) && this.failures >= 1) {
        this.showEnded();
      } else if (this.failures >= 5 && this.lease !== null) {
        this.showEnded();
      }
      return;
    }
    if (answer.lease) {
      this.lease = answer.lease;
      this.offset = Date.parse(answer.lease.now) - Date.now();
      this.warnings(answer.lease);
    }
    if (answer.ended) {
      this.showEnded();
      return;
    }
    if (answer.stopping && !this.stopping) {
      this.stopping = true;
      await this.saveForStop();
    }
    this.render();
  }

  private render(): void {
    if (this.ended) {
      this.text.textContent = 'Session ended';
      return;
    }
    if (!this.lease) {
      this.text.textContent = 'NexCompute: connecting…';
      return;
    }
    const ms = Date.parse(this.lease.expires_at) - (Date.now() + this.offset);
    const what = this.stopping ? 'ending now' : left(ms);
    this.text.textContent = `${this.lease.machine.name} · ${what}`;
    this.text.title = `NexCompute session ${this.lease.session_id} on ${this.lease.machine.name}, until ${clock(this.lease.expires_at)}`;
  }

  private remember(): void {
    try {
      sessionStorage.setItem(
        'nexcompute-seen-warnings',
        JSON.stringify(Array.from(this.seen))
      );
    } catch {
      // see the constructor
    }
  }

  /** The newest warning not shown yet (old ones from before this tab opened stay quiet). */
  private warnings(lease: Lease): void {
    if (this.stopping) {
      return; // the final notice stays
    }
    let newest: { at: string; message: string } | null = null;
    for (const w of lease.warnings) {
      const key = `${w.at}|${w.message}`;
      if (this.seen.has(key)) {
        continue;
      }
      this.seen.add(key);
      if (Date.parse(w.at) - this.offset < this.loadedAt - FRESH_WARNING_MS) {
        continue;
      }
      newest = w;
    }
    this.remember();
    if (newest) {
      this.showWarning(newest.message, lease);
    }
  }

  private makeBanner(): HTMLElement {
    this.banner?.remove();
    const banner = document.createElement('div');
    banner.className = 'nexcompute-banner';
    banner.setAttribute('role', 'alert');
    document.body.appendChild(banner);
    this.banner = banner;
    return banner;
  }

  private button(label: string, onClick: () => void, title = ''): HTMLButtonElement {
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = label;
    if (title) {
      b.title = title;
    }
    b.addEventListener('click', onClick);
    return b;
  }

  private showWarning(message: string, lease: Lease): void {
    const banner = this.makeBanner();
    banner.setAttribute('data-nexcompute-warning', '');
    const text = document.createElement('span');
    text.className = 'nexcompute-banner-message';
    text.textContent = message;
    banner.appendChild(text);
    const note = document.createElement('span');
    note.className = 'nexcompute-banner-note';
    note.setAttribute('aria-live', 'polite');
    const ext = lease.extend;
    const extend = (minutes: number): void => void this.extend(minutes, note);
    if (ext.default_minutes !== null) {
      const d = ext.default_minutes;
      banner.appendChild(this.button('Extend', () => extend(d), `Extend by ${d} min`));
      for (const m of ext.choices_minutes) {
        if (m !== d) {
          banner.appendChild(this.button(`+${m} min`, () => extend(m), `Extend by ${m} min`));
        }
      }
    } else if (ext.reason) {
      note.textContent = `Extend is not possible: ${ext.reason}.`;
    }
    banner.appendChild(
      this.button('Save all and download workspace', () => void this.saveAndDownload(note))
    );
    banner.appendChild(this.button('Dismiss', () => banner.remove()));
    banner.appendChild(note);
  }

  private async extend(minutes: number, note: HTMLElement): Promise<void> {
    note.textContent = 'Extending…';
    try {
      const resp = await this.call('extend', 'POST', { minutes });
      const data = (await resp.json()) as Lease & { detail?: string };
      if (!resp.ok) {
        note.textContent = `Could not extend: ${data.detail ?? resp.status}`;
        return;
      }
      this.lease = data;
      this.render();
      note.textContent = `Extended by ${minutes} min, now until ${clock(data.expires_at)}.`;
      note.setAttribute('data-nexcompute-extended', data.expires_at);
    } catch (err) {
      note.textContent = `Could not extend: ${String(err)}`;
    }
  }

  private async saveAll(): Promise<void> {
    if (this.app.commands.hasCommand('docmanager:save-all')) {
      await this.app.commands.execute('docmanager:save-all');
    }
  }

  private async saveAndDownload(note: HTMLElement): Promise<void> {
    note.textContent = 'Saving all open documents…';
    try {
      await this.saveAll();
    } catch (err) {
      note.textContent = `Could not save everything: ${String(err)}`;
    }
    const a = document.createElement('a');
    a.href = this.url('download');
    a.download = '';
    document.body.appendChild(a);
    a.click();
    a.remove();
    note.textContent = 'Saved; the download of your workspace has started.';
  }

  /** The agent is stopping the session: a final notice, then save everything and say so. */
  private async saveForStop(): Promise<void> {
    if (this.savedForStop) {
      return;
    }
    this.savedForStop = true;
    const banner = this.makeBanner();
    banner.setAttribute('data-nexcompute-final', '');
    banner.textContent =
      'This session is ending now. Saving all open documents before the machine is wiped…';
    try {
      await this.saveAll();
      banner.textContent = 'This session is ending now. All open documents were saved.';
    } catch (err) {
      banner.textContent = `This session is ending now. Saving failed: ${String(err)}`;
    }
    try {
      await this.call('saved', 'POST');
    } catch {
      // the stop goes on regardless
    }
  }

  private showEnded(): void {
    if (this.ended) {
      return;
    }
    this.ended = true;
    this.render();
    this.banner?.remove();
    const cover = document.createElement('div');
    cover.className = 'nexcompute-ended';
    cover.setAttribute('data-nexcompute-ended', '');
    const box = document.createElement('div');
    const h = document.createElement('h1');
    h.textContent = 'This session has ended';
    const p = document.createElement('p');
    p.textContent =
      'Its Jupyter Lab is closed and the machine is being wiped. Start a new session from the NexCompute dashboard.';
    box.append(h, p);
    cover.appendChild(box);
    document.body.appendChild(cover);
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'nexcompute-jupyter:plugin',
  description: 'NexCompute: time left, lease warnings, Extend, save before the end.',
  autoStart: true,
  optional: [IStatusBar],
  activate: (app: JupyterFrontEnd, statusBar: IStatusBar | null) => {
    const nx = new NexCompute(app);
    if (statusBar) {
      statusBar.registerStatusItem('nexcompute-jupyter:time-left', {
        item: nx.status,
        align: 'left',
        rank: -1
      });
    } else {
      nx.status.addClass('nexcompute-status-floating');
      Widget.attach(nx.status, document.body);
    }
    app.restored.then(() => nx.start());
  }
};

export default plugin;
