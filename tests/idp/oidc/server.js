// OpenID Connect provider for NexCompute's SSO tests (loopback only), built on `oidc-provider`.
//
//   node server.js CONFIG.json
//
// CONFIG: {"port": 0, "issuer": "http://localhost:PORT", "accounts_file": "...",
//          "client": {"client_id", "client_secret", "redirect_uris", "post_logout_redirect_uris"}}
// The accounts file, {"alice": {"password", "email", "name", "given_name", "family_name",
// "groups": [...]}}, is read again on every login and claims request, so a test can change a
// user's groups between logins. The login form (/interaction/:uid, fields `login` and
// `password`) refuses a wrong password and stays on the page.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';

import Provider from 'oidc-provider';

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));

function accounts() {
  return JSON.parse(fs.readFileSync(config.accounts_file, 'utf8'));
}

function escapeHtml(value) {
  return String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'test-key', use: 'sig', alg: 'RS256' };

const provider = new Provider(config.issuer, {
  clients: [
    {
      token_endpoint_auth_method: 'client_secret_post',
      grant_types: ['authorization_code'],
      response_types: ['code'],
      ...config.client,
    },
  ],
  jwks: { keys: [jwk] },
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'given_name', 'family_name', 'preferred_username'],
    groups: ['groups'],
  },
  features: {
    devInteractions: { enabled: false },
    rpInitiatedLogout: {
      enabled: true,
      async logoutSource(ctx, form) {
        // `form` is the provider's <form id="op.logoutForm"> with its xsrf field; the button
        // submits it with logout=yes.
        ctx.body = `<!DOCTYPE html><html><head><title>Sign out</title></head><body>
          <h1>Sign out of the test IdP?</h1>${form}
          <button type="submit" form="op.logoutForm" name="logout" value="yes">Yes, sign me out</button>
          </body></html>`;
      },
    },
  },
  interactions: {
    url(ctx, interaction) {
      return `/interaction/${interaction.uid}`;
    },
  },
  // First-party client: grant every requested scope and claim without a consent screen.
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId
      || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) {
      const existing = await ctx.oidc.provider.Grant.find(grantId);
      if (existing) return existing;
    }
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope(ctx.oidc.params.scope || 'openid');
    await grant.save();
    return grant;
  },
  async findAccount(ctx, sub) {
    const account = accounts()[sub];
    if (!account) return undefined;
    return {
      accountId: sub,
      async claims() {
        const fresh = accounts()[sub] || account;
        return {
          sub,
          preferred_username: sub,
          email: fresh.email,
          email_verified: true,
          name: fresh.name,
          given_name: fresh.given_name,
          family_name: fresh.family_name,
          groups: fresh.groups || [],
        };
      },
    };
  },
  ttl: { Session: 3600, Interaction: 600, AccessToken: 600, IdToken: 600, Grant: 3600 },
});

function loginPage(uid, error, login) {
  return `<!DOCTYPE html><html><head><title>Test IdP login</title></head><body>
    <h1>Test university login</h1>
    ${error ? `<p class="error" role="alert">${escapeHtml(error)}</p>` : ''}
    <form method="post" action="/interaction/${escapeHtml(uid)}/login">
      <label for="login">Username</label>
      <input id="login" name="login" value="${escapeHtml(login || '')}" required>
      <label for="password">Password</label>
      <input id="password" name="password" type="password" required>
      <button type="submit">Sign in</button>
    </form></body></html>`;
}

function readForm(req) {
  return new Promise((resolve, reject) => {
    let body = '';
    req.on('data', (chunk) => { body += chunk; });
    req.on('end', () => resolve(Object.fromEntries(new URLSearchParams(body))));
    req.on('error', reject);
  });
}

function send(res, status, html) {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(html);
}

async function interaction(req, res) {
  const url = new URL(req.url, config.issuer);
  const details = await provider.interactionDetails(req, res);
  if (req.method === 'GET' && url.pathname === `/interaction/${details.uid}`) {
    if (details.prompt.name === 'login') {
      return send(res, 200, loginPage(details.uid));
    }
    // Any other prompt (consent) is granted at once: loadExistingGrant made the grant.
    return provider.interactionFinished(req, res, {}, { mergeWithLastSubmission: true });
  }
  if (req.method === 'POST' && url.pathname === `/interaction/${details.uid}/login`) {
    const form = await readForm(req);
    const account = accounts()[form.login];
    const given = Buffer.from(String(form.password || ''));
    const expected = Buffer.from(String(account?.password || ''));
    const ok = account && given.length === expected.length && crypto.timingSafeEqual(given, expected);
    if (!ok) {
      return send(res, 200, loginPage(details.uid, 'Invalid username or password.', form.login));
    }
    return provider.interactionFinished(
      req, res, { login: { accountId: form.login } }, { mergeWithLastSubmission: false },
    );
  }
  return send(res, 404, 'not found');
}

const handler = provider.callback();
const server = http.createServer((req, res) => {
  if (req.url.startsWith('/interaction/')) {
    interaction(req, res).catch((err) => {
      console.error(err);
      send(res, 400, `interaction failed: ${escapeHtml(err.message)}`);
    });
    return;
  }
  handler(req, res);
});

server.listen(config.port, '127.0.0.1', () => {
  console.log(`oidc test idp listening on ${config.issuer} (port ${server.address().port})`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
